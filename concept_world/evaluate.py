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
