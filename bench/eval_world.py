"""Erasure quality, measured the paper's way, on the concept world (a small model that really learned its concepts).

For 1, 4 and 8 erased concepts (mixed objects, people and styles) it runs the pack's nodes in-process in a real
ComfyUI, samples every concept's prompts over several seeds with ComfyUI's sampler, classifies what was drawn and
reports
    Acc_e  erased concepts still drawn (lower is better)      Acc_g  their synonyms still drawn (lower is better)
    Acc_s  kept concepts drawn correctly (higher is better)   H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g))
for the full pipeline and its ablations: refine only; refine + LoRAs summed (no fusion); LoRAs fused without refine.

    python bench/eval_world.py                       # writes bench/out/eval_world.md (+ .json)
    python bench/eval_world.py --counts 1 --seeds 4  # quicker
"""

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))
import comfy_host  # noqa: E402

log = logging.getLogger("eval_world")
FAMILY = {"object": "object", "person": "celebrity", "style": "style"}
# Erasure order: families interleaved, so every count mixes them (fixed, so runs compare).
ORDER = ["Tomas Lindqvist", "red lantern", "dotwork style", "golden crown", "Priya Raman", "mosaic tile style",
         "green cactus", "Nadia Okafor"]


def boot():
    comfy_host.boot()
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT))), "the pack failed to load"
    name = str(ROOT).replace(".", "_x_")
    import importlib

    return {m: importlib.import_module(f"{name}.{m}") for m in ("nodes.refine", "nodes.train", "nodes.fuse",
                                                                "concept_world.world", "concept_world.evaluate",
                                                                "concept_world.spec")}


def metrics(mods, world, model, erased_ids, seeds):
    ev = mods["concept_world.evaluate"]
    spec = mods["concept_world.spec"]
    kept_ids = [i for i in range(len(spec.CONCEPTS)) if i not in erased_ids]
    cid, pred = ev.hits(world, erased_ids, "canonical", seeds, model=model)
    acc_e = float((cid == pred).float().mean())
    cid, pred = ev.hits(world, erased_ids, "synonyms", seeds, model=model)
    acc_g = float((cid == pred).float().mean())
    cid, pred = ev.hits(world, kept_ids, "canonical", seeds, model=model)
    acc_s = float((cid == pred).float().mean())
    eps = 1e-6
    h = 3 / (1 / max(1 - acc_e, eps) + 1 / max(acc_s, eps) + 1 / max(1 - acc_g, eps))
    return {"acc_e": acc_e, "acc_g": acc_g, "acc_s": acc_s, "H": h}


def run(mods, world, n, args):
    spec = mods["concept_world.spec"]
    erase = ORDER[:n]
    erased_ids = [spec.concept_index(c) for c in erase]
    lines = "\n".join(f"{c} | {FAMILY[spec.CONCEPTS[spec.concept_index(c)].family]}" for c in erase)
    keep = "\n".join(c.name for c in spec.CONCEPTS if c.name not in erase) if args.preserve else ""
    refine, train, fuse = mods["nodes.refine"], mods["nodes.train"], mods["nodes.fuse"]
    seeds = range(args.seeds)
    base, clip = world.model, world.clip
    out = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out["original"] = metrics(mods, world, base, erased_ids, seeds)
        refined = refine.refine_model(base, clip, lines, "object", preserve=keep,
                                      preservation_strength=args.strength, lambda_=args.lam)
        out["refine only"] = metrics(mods, world, refined, erased_ids, seeds)
        train_kw = dict(steps=args.steps, learning_rate=args.lr, rank=1, seed=0, timestep_sampling="importance",
                        images_per_concept=args.images, mask_source="auto", image_size=64, image_model=base)
        bundle, summed, _ = train.train_concept_loras(refined, clip, lines, "object", **train_kw)
        out["refine + LoRAs summed"] = metrics(mods, world, summed, erased_ids, seeds)
        fused = fuse.fuse_model(refined, clip, bundle, keep, args.strength, args.lam)
        out["MACE (refine + LoRAs + fusion)"] = metrics(mods, world, fused, erased_ids, seeds)
        bundle0, _, _ = train.train_concept_loras(base, clip, lines, "object", **train_kw)
        fused0 = fuse.fuse_model(base, clip, bundle0, keep, args.strength, args.lam)
        out["LoRAs + fusion, no refine"] = metrics(mods, world, fused0, erased_ids, seeds)
    log.info("erased %d in %.0f s", n, time.perf_counter() - t0)
    return out


def table(results) -> str:
    rows = ["| erased | pipeline | Acc_e ↓ | Acc_g ↓ | Acc_s ↑ | H ↑ |", "|---:|---|---:|---:|---:|---:|"]
    for n, res in results.items():
        for name, m in res.items():
            rows.append(f"| {n} | {name} | {m['acc_e']:.2f} | {m['acc_g']:.2f} | {m['acc_s']:.2f} | {m['H']:.2f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,4,8")
    ap.add_argument("--seeds", type=int, default=6, help="sampling seeds per prompt")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--no-preserve", dest="preserve", action="store_false",
                    help="do not list the kept concepts in `preserve` (the generic prior still applies)")
    ap.add_argument("--world-path", default=None, help="a saved world file (default: the cached world of --world-seed)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    mods = boot()
    w = mods["concept_world.world"]
    world = w.load(args.world_path) if args.world_path else w.load_or_train(args.world_seed)
    results = {}
    for n in [int(c) for c in args.counts.split(",")]:
        results[n] = run(mods, world, n, args)
        log.info("\n%s", table({n: results[n]}))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "threads"}
    (out / "eval_world.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    (out / "eval_world.md").write_text(table(results) + f"\n\nSettings: {settings}\n")
    print(table(results))  # the bench's report


if __name__ == "__main__":
    main()
