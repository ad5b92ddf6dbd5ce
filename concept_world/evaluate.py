"""Does a MODEL draw what the prompts ask for? The building block of erasure efficacy / specificity / generality.

A (concept, seed) case is one prompt: the concept's canonical name (or a synonym) in one of its concept type's
templates, chosen by the seed, so a handful of seeds covers the templates.
"""

import torch

from .spec import CONCEPT_TYPES, STANDARD


def cases(concepts=None, names="canonical", seeds=range(4), sp=STANDARD):
    """(concept ids, prompts, seeds) for every (concept, seed); names: "canonical" or "synonyms"."""
    concepts = range(len(sp.CONCEPTS)) if concepts is None else concepts
    cids, prompts, out_seeds = [], [], []
    for c in concepts:
        concept = sp.CONCEPTS[c]
        pool = concept.names[:1] if names == "canonical" else concept.names[1:]
        templates = sp.TEMPLATES[concept.concept_type]
        for k, s in enumerate(seeds):
            cids.append(c)
            prompts.append(templates[k % len(templates)].format(pool[(k // len(templates) + k) % len(pool)]))
            out_seeds.append(int(s))
    return cids, prompts, out_seeds


def hits(world, concepts=None, names="canonical", seeds=range(4), model=None, clip=None, **settings):
    """(concept ids, predicted ids) tensors over all cases."""
    cids, prompts, seeds = cases(concepts, names, seeds, world.spec)
    pred = world.predict_pairs(prompts, seeds, model, clip, **settings)
    return torch.tensor(cids), pred


def draw_accuracy(world, seeds=range(4), model=None, clip=None, **settings):
    """Fraction of cases drawn as their own concept, per concept type and name kind; anchors: fraction drawn as none."""
    sp = world.spec
    out = {}
    for names in ("canonical", "synonyms"):
        cids, pred = hits(world, None, names, seeds, model, clip, **settings)
        ok = (cids == pred).float()
        out[names] = round(ok.mean().item(), 4)
        for ctype in CONCEPT_TYPES:
            sel = torch.tensor([sp.CONCEPTS[c].concept_type == ctype for c in cids.tolist()])
            out[f"{names}_{ctype}"] = round(ok[sel].mean().item(), 4)
        if names == "canonical":
            out["per_concept"] = {c.name: round(ok[cids == i].mean().item(), 3) for i, c in enumerate(sp.CONCEPTS)}
    prompts = [t.format(a) for ctype in CONCEPT_TYPES for a in sp.ANCHORS[ctype] for t in sp.TEMPLATES[ctype][:2]]
    pred = world.predict_pairs(prompts, [i for i in range(len(prompts))], model, clip, **settings)
    out["anchors_none"] = round((pred == sp.NONE).float().mean().item(), 4)
    return out


def outside_span(world, counts, template="a photo of {}", clip=None) -> dict:
    """For each count n (the first n of the world's erasure order erased, the rest kept): the share of an erased
    concept's text feature that lies outside the span of the kept concepts' features, mean over the erased.

    The feature is the end token's of `template` with the canonical name, less the mean over every concept. A linear
    edit of the text road (refine, fusion, UCE) can move an erased concept and hold every kept one only along this
    part: at 0 the erased features are combinations of the kept ones', and whatever moves them moves those."""
    from . import nets

    sp = world.spec
    clip = world.clip if clip is None else clip
    feats = []
    for c in sp.CONCEPTS:
        prompt = template.format(c.name)
        ids = nets.token_ids(clip, prompt)
        end = ids.index(ids[-1], 1)  # the first end (pad) token after the start token
        cond = world.encode([prompt], clip)[0][0]
        feats.append(cond[0, end].double())
    x = torch.stack(feats)
    x = x - x.mean(0)
    out = {}
    for n in counts:
        erased = [sp.concept_index(name) for name in sp.ORDER[:n]]
        kept = [i for i in range(len(sp.CONCEPTS)) if i not in set(erased)]
        q, _ = torch.linalg.qr(x[kept].T)  # columns: an orthonormal basis of the kept features' span
        e = x[erased]
        rest = e - (e @ q) @ q.T
        out[n] = round((rest.norm(dim=1) / e.norm(dim=1)).mean().item(), 3)
    return out
