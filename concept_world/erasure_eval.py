"""Erasure quality on the concept world, measured the paper's way, shared by bench/eval_world.py and the tests.

Erase some of the world's concepts with the pack's own node functions (refine, train, fuse), sample every concept's
prompts over several seeds with ComfyUI's sampler, classify what was drawn and report
    Acc_e  erased concepts still drawn (lower is better)      Acc_g  their synonyms still drawn (lower is better)
    Acc_s  kept concepts drawn correctly (higher is better)   H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g))
for the full pipeline and the paper's ablations.
"""

import logging
import time
from dataclasses import asdict, dataclass

import torch

from . import evaluate, uce
from .spec import STANDARD

log = logging.getLogger(__name__)

# The world's concept types as MACE's (the world calls its people 'person').
TYPE = {"object": "object", "person": "celebrity", "style": "style"}
# The standard world's erasure order (each world's spec carries its own: spec.WorldSpec.ORDER).
ORDER = list(STANDARD.ORDER)

ORIGINAL = "original"
REFINE = "refine only"
SUMMED = "refine + LoRAs summed"
MACE = "MACE (refine + LoRAs + fusion)"
NO_REFINE = "LoRAs + fusion, no refine"
UCE = "UCE-style baseline"  # the comparison: UCE's closed form on end-token vectors (uce.py); cheap, so always run
PIPELINES = (ORIGINAL, REFINE, SUMMED, MACE, NO_REFINE, UCE)


@dataclass
class Settings:
    """The nodes' defaults (the paper's): what a user gets without touching a setting."""
    steps: int = 50
    lr: float = 1e-4
    rank: int = 1
    images: int = 8
    strength: float = 1.0
    lam: float = 0.01
    preserve: bool = True  # list the concepts not erased in `preserve` (the generic prior applies either way)
    seed: int = 0
    preservation_target: str = "input"  # Fuse: hold generic prompts to the refined input or the original model (paper)
    edit_pooled: bool | None = None  # Refine: also edit SDXL's pooled-vector road (None: the node's default)
    # Refine's preservation_strength when it differs from Fuse's (None: `strength` for both, as the nodes default).
    # The paper's code scales refinement's kept and generic terms twice (1e-4 x 1e-4) and fusion's once: 1e-4 here
    # with `preservation_target` "original" is that split, measured as an ablation (docs/mass_world.md)
    refine_strength: float | None = None


def concept_lines(names, sp) -> str:
    """The nodes' concept box for these world concepts: `name | type` per line."""
    return "\n".join(f"{n} | {TYPE[sp.CONCEPTS[sp.concept_index(n)].concept_type]}" for n in names)


def harmonic(acc_e, acc_g, acc_s, eps=1e-6) -> float:
    return 3 / (1 / max(1 - acc_e, eps) + 1 / max(acc_s, eps) + 1 / max(1 - acc_g, eps))


def scores(world, model, erased, seeds, detail: bool = False) -> dict:
    """Acc_e, Acc_g, Acc_s and H of `model` with the concepts `erased` (names) gone.

    detail: also "misses", the cases behind each number that went the wrong way, per concept (see misses())."""
    sp = world.spec
    erased_ids = [sp.concept_index(n) for n in erased]
    kept_ids = [i for i in range(len(sp.CONCEPTS)) if i not in erased_ids]
    out, found = {}, {}
    for key, ids, names in (("acc_e", erased_ids, "canonical"), ("acc_g", erased_ids, "synonyms"),
                            ("acc_s", kept_ids, "canonical")):
        cid, pred = evaluate.hits(world, ids, names, seeds, model=model)
        out[key] = float((cid == pred).float().mean())
        found[key] = (cid, pred)
    out["H"] = harmonic(out["acc_e"], out["acc_g"], out["acc_s"])
    if detail:
        out["misses"] = misses(found, sp)
    return out


def misses(found: dict, sp) -> dict:
    """Where a score lost: {"acc_e"/"acc_g": {erased concept: cases still drawn}, "acc_s": {kept concept: cases
    drawn as something else}}, each "k/n" with what was drawn instead when a kept concept was lost (the classifier's
    most frequent other answer), so a table's number can be traced to the concepts behind it."""
    out = {}
    for key, (cid, pred) in found.items():
        per = {}
        for c in cid.unique().tolist():
            got = pred[cid == c]
            wrong = got[got != c] if key == "acc_s" else got[got == c]
            if len(wrong):
                entry = f"{len(wrong)}/{len(got)}"
                if key == "acc_s":
                    entry += f" as {sp.CLASS_NAMES[int(wrong.mode().values)]}"
                per[sp.CONCEPTS[c].name] = entry
        out[key] = per
    return out


def erase(world, erased, settings: Settings = Settings(), pipelines=PIPELINES, times=None) -> dict:
    """{pipeline: MODEL} for the requested pipelines, each a patched clone of world.model (never changed).

    times: a dict that receives each stage's seconds: "refine", "train" and "fuse" of the full pipeline, "train (no
    refine)" and "fuse (no refine)" of that ablation, "uce" of the baseline (only the stages that ran)."""
    from ..nodes import fuse, refine, train

    s = settings
    times = {} if times is None else times
    lines = concept_lines(erased, world.spec)
    preserve = "\n".join(c.name for c in world.spec.CONCEPTS if c.name not in erased) if s.preserve else ""
    base, clip = world.model, world.clip
    train_kw = dict(steps=s.steps, learning_rate=s.lr, rank=s.rank, seed=s.seed, timestep_sampling="importance",
                    images_per_concept=s.images, mask_source="auto", image_size=64, image_model=base)

    def timed(stage, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        times[stage] = time.perf_counter() - t0
        return out

    out = {}
    with torch.inference_mode():
        if ORIGINAL in pipelines:
            out[ORIGINAL] = base
        if {REFINE, SUMMED, MACE} & set(pipelines):
            pooled = {} if s.edit_pooled is None else {"edit_pooled": s.edit_pooled}
            refined = timed("refine", refine.refine_model, base, clip, lines, "object", preserve=preserve,
                            preservation_strength=s.strength if s.refine_strength is None else s.refine_strength,
                            lambda_=s.lam, **pooled)
            out[REFINE] = refined
            if {SUMMED, MACE} & set(pipelines):
                bundle, out[SUMMED], _ = timed("train", train.train_concept_loras, refined, clip, lines, "object",
                                               **train_kw)
                out[MACE] = timed("fuse", fuse.fuse_model, refined, clip, bundle, preserve, s.strength, s.lam,
                                  s.preservation_target)
        if NO_REFINE in pipelines:
            bundle0, _, _ = timed("train (no refine)", train.train_concept_loras, base, clip, lines, "object",
                                  **train_kw)
            out[NO_REFINE] = timed("fuse (no refine)", fuse.fuse_model, base, clip, bundle0, preserve, s.strength,
                                   s.lam, s.preservation_target)
        if UCE in pipelines:
            # the same concepts, anchors and preserve list as the pack's pipelines; UCE's own ridge (uce.LAM), not s.lam
            out[UCE] = timed("uce", uce.uce_model, base, clip, lines, preserve)
    return {p: out[p] for p in pipelines}


def measure(world, erased, seeds=range(6), settings: Settings = Settings(), pipelines=PIPELINES) -> dict:
    """{pipeline: scores} for erasing the concepts `erased` (names) with `settings`."""
    t0 = time.perf_counter()
    models = erase(world, erased, settings, pipelines)
    with torch.inference_mode():
        out = {p: scores(world, m, erased, seeds) for p, m in models.items()}
    log.info("concept world: erased %d concepts, %d pipelines scored in %.0f s (settings %s)", len(erased),
             len(out), time.perf_counter() - t0, asdict(settings))
    return out
