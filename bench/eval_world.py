"""Erasure quality, measured the paper's way, on the concept world (a small model that really learned its concepts).

For 1, 4 and 8 erased concepts (mixed objects, people and styles) it runs the pack's nodes in-process in a real
ComfyUI, samples every concept's prompts over several seeds with ComfyUI's sampler, classifies what was drawn and
reports
    Acc_e  erased concepts still drawn (lower is better)      Acc_g  their synonyms still drawn (lower is better)
    Acc_s  kept concepts drawn correctly (higher is better)   H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g))
for the full pipeline and its ablations: refine only; refine + LoRAs summed (no fusion); LoRAs fused without refine;
and a UCE-style baseline (concept_world/uce.py) to compare against.
Beside the table it lists the concepts behind each number: erased ones still drawn, kept ones lost and drawn as what.

    python bench/eval_world.py                       # writes bench/out/eval_world.md (+ .json) and the grid
    python bench/eval_world.py --counts 1 --seeds 4  # quicker
    python bench/eval_world.py --world-seeds 0,1 --counts 8 --no-grid --suffix _worlds  # two worlds and their mean
    python bench/eval_world.py --pipelines refine,mace,uce --no-grid --suffix _uce  # a subset of the pipelines
    python bench/eval_world.py --text-width 96 --counts 8 --lr 2e-2 --no-grid --suffix _text96  # a wider world
    python bench/eval_world.py --family sdxl --counts 8 --pooled both --no-grid --suffix _sdxl  # the SDXL world,
                                                     # every pipeline with pooled editing off and on
    python bench/eval_world.py --world mass --suffix _mass   # the mass world (126 concepts): erasing 10, 25, 50
                                                     # and 100, each stage timed, H against the count plotted in
                                                     # docs/mass_erasure.png
    python bench/eval_world.py --world mass --counts 10,100 --threads 1 --no-grid --suffix _mass_a &   # the same
    python bench/eval_world.py --world mass --counts 25,50 --threads 1 --no-grid --suffix _mass_b; wait   # on 2 cores
    python bench/eval_world.py --join bench/out/eval_world_mass_a.json,bench/out/eval_world_mass_b.json --suffix _mass
    python bench/eval_world.py --world mass --pipelines refine,mace --timing-only --suffix _mass_time  # stages' time
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
GRID = ROOT / "docs" / "world_erasure_grid{}.png"
PLOT = ROOT / "docs" / "{}_erasure.png"  # per world: mass, mosaic
# the worlds (concept_world presets) and the erased counts measured on each by default
WORLDS = {"standard": ("full", "1,4,8"), "mass": ("mass", "10,25,50,100"), "mosaic": ("mosaic", "10,25,50,100")}


def boot():
    comfy_host.boot()
    import importlib

    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT))), "the pack failed to load"
    name = str(ROOT).replace(".", "_x_")
    return {m: importlib.import_module(f"{name}.concept_world.{m}")
            for m in ("world", "erasure_eval", "spec", "evaluate")}


def run(mods, world, n, args):
    ee = mods["erasure_eval"]
    erased = list(world.spec.ORDER[:n])
    pooled = {"off": [False], "on": [True], "both": [False, True], "default": [None]}[args.pooled]
    out, models, times = {}, {}, {}
    t0 = time.perf_counter()
    for edit_pooled in pooled:
        settings = ee.Settings(steps=args.steps, lr=args.lr, images=args.images, strength=args.strength,
                               lam=args.lam, preserve=args.preserve,
                               preservation_target=args.preservation_target,
                               edit_pooled=edit_pooled, refine_strength=args.refine_strength)
        # without pooled editing the no-refine ablation is the same either way: run it once
        pipelines = ee.PIPELINES if edit_pooled is not True or len(pooled) == 1 else ee.PIPELINES[1:4]
        pipelines = tuple(p for p in pipelines if p in chosen(ee, args))
        stages = {}
        got = ee.erase(world, erased, settings, pipelines, stages)
        times.update({k + tag_of(edit_pooled, pooled): v for k, v in stages.items()})
        tag = tag_of(edit_pooled, pooled)
        with torch.inference_mode():
            for p, m in got.items() if not args.timing_only else ():
                name = p if p in (ee.ORIGINAL, ee.NO_REFINE, ee.UCE) else p + tag  # UCE never edits pooled
                out[name] = ee.scores(world, m, erased, range(args.seeds), detail=True)
                models[name] = m
    log.info("erased %d in %.0f s; stages %s", n, time.perf_counter() - t0,
             {k: round(v, 1) for k, v in times.items()})
    return out, models, times


def tag_of(edit_pooled, pooled) -> str:
    return "" if len(pooled) == 1 else (", pooled on" if edit_pooled else ", pooled off")


# --pipelines: which pipelines a run erases and scores (all by default); short names for erasure_eval's constants
PIPELINE_ARGS = {"original": "ORIGINAL", "refine": "REFINE", "summed": "SUMMED", "mace": "MACE",
                 "no-refine": "NO_REFINE", "uce": "UCE"}


def chosen(ee, args) -> set:
    return {getattr(ee, PIPELINE_ARGS[k]) for k in args.pipelines.split(",")}


def grid(mods, world, erased, before, after, path, seeds=(0, 1), kept=4):
    """Before/after picture: rows are prompts (each erased concept's name and a synonym, then a few kept concepts),
    columns the same seeds drawn by the original and by the erased model."""
    from PIL import Image, ImageDraw, ImageFont

    spec = world.spec
    rows = []
    for name in erased[:4]:
        c = spec.CONCEPTS[spec.concept_index(name)]
        rows += [(f"{name} (erased)", spec.prompts_for(spec.concept_index(name))[0]),
                 (f"{c.synonyms[0]} (synonym)", spec.prompts_for(spec.concept_index(name), "synonyms")[0])]
    for c in [c for c in spec.CONCEPTS if c.name not in erased][::3][:kept]:
        rows.append((f"{c.name} (kept)", spec.prompts_for(spec.concept_index(c.name))[0]))
    prompts = [p for _, p in rows]
    with torch.inference_mode():
        imgs = [world.generate(prompts, seeds, model=m) for m in (before, after)]  # (P, S, 64, 64, 3) each
    cell, label_w, head = 96, 250, 26
    cols = 2 * len(seeds)
    img = Image.new("RGB", (label_w + cols * cell + 12, head + len(rows) * cell), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((label_w, 6), "original model", fill="black", font=font)
    draw.text((label_w + len(seeds) * cell + 12, 6), "after MACE", fill="black", font=font)
    for r, (label, prompt) in enumerate(rows):
        y = head + r * cell
        draw.text((6, y + cell // 2 - 12), label, fill="black", font=font)
        draw.text((6, y + cell // 2 + 2), f'"{prompt}"'[:40], fill=(90, 90, 90), font=font)
        for k, block in enumerate(imgs):
            for j in range(len(seeds)):
                arr = (block[r, j].clamp(0, 1) * 255).round().byte().cpu().numpy()
                tile = Image.fromarray(arr).resize((cell - 4, cell - 4), Image.NEAREST)
                img.paste(tile, (label_w + k * (len(seeds) * cell + 12) + j * cell, y + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(256).save(path, optimize=True)  # a palette keeps the README's picture small
    log.info("wrote %s", path)


def table(results, spread: bool = False) -> str:
    rows = ["| erased | pipeline | Acc_e ↓ | Acc_g ↓ | Acc_s ↑ | H ↑ |" + (" H range |" if spread else ""),
            "|---:|---|---:|---:|---:|---:|" + ("---:|" if spread else "")]
    for n, res in results.items():
        for name, m in res.items():
            row = f"| {n} | {name} | {m['acc_e']:.2f} | {m['acc_g']:.2f} | {m['acc_s']:.2f} | {m['H']:.2f} |"
            rows.append(row + (f" {m['H_min']:.2f}-{m['H_max']:.2f} |" if spread else ""))
    return "\n".join(rows)


def mean_over_worlds(per_world: dict) -> dict:
    """{count: {pipeline: scores}} averaged over the worlds (each a {count: {pipeline: scores}}): the accuracies' and
    H's means, and H's range over the worlds."""
    first = next(iter(per_world.values()))
    out = {}
    for n, res in first.items():
        out[n] = {}
        for name in res:
            got = [w[n][name] for w in per_world.values()]
            mean = {k: sum(g[k] for g in got) / len(got) for k in ("acc_e", "acc_g", "acc_s", "H")}
            out[n][name] = dict(mean, H_min=min(g["H"] for g in got), H_max=max(g["H"] for g in got))
    return out


def time_table(times: dict) -> str:
    """Seconds per stage for each count, and the cost ratio the mass-erasure goal is about: refine and fuse against
    the LoRA training between them."""
    rows = ["| erased | refine s | train s | fuse s | (refine + fuse) / train | UCE-style s |",
            "|---:|---:|---:|---:|---:|---:|"]
    for n, t in times.items():
        if not {"refine", "train", "fuse"} <= set(t):
            continue
        ratio = (t["refine"] + t["fuse"]) / max(t["train"], 1e-9)
        rows.append(f"| {n} | {t['refine']:.1f} | {t['train']:.1f} | {t['fuse']:.1f} | {100 * ratio:.1f} % | "
                    f"{t.get('uce', float('nan')):.1f} |")
    return "\n".join(rows)


def plot(results: dict, path: Path, title: str):
    """H against the number erased, one line per pipeline (the original model's is left out: it erases nothing)."""
    from PIL import Image, ImageDraw, ImageFont

    counts = sorted(results)
    names = [p for p in next(iter(results.values())) if p != "original"]
    colors = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (120, 120, 120)]
    w, h, left, right, top, bottom = 800, 430, 60, 290, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pw, ph = w - left - right, h - top - bottom

    def xy(i, value):
        x = left + (pw * i / max(len(counts) - 1, 1))
        return x, top + ph * (1 - value)

    for k in range(6):  # H gridlines at 0, 0.2, ... 1
        y = top + ph * (1 - k / 5)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        d.text((left - 30, y - 6), f"{k / 5:.1f}", fill="black", font=font)
    for i, n in enumerate(counts):
        x, _ = xy(i, 0)
        d.text((x - 8, top + ph + 8), str(n), fill="black", font=font)
    d.text((left + pw / 2 - 50, h - 22), "concepts erased", fill="black", font=font)
    d.text((8, 12), "H", fill="black", font=font)
    d.text((left, 12), title, fill=(60, 60, 60), font=font)
    for j, name in enumerate(names):
        color = colors[j % len(colors)]
        pts = [xy(i, results[n][name]["H"]) for i, n in enumerate(counts) if name in results[n]]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.line([(left + pw + 16, top + 10 + 22 * j), (left + pw + 40, top + 10 + 22 * j)], fill=color, width=3)
        # the value at the largest count beside the name: lines that coincide still read apart
        last = results[counts[-1]].get(name, {}).get("H")
        d.text((left + pw + 46, top + 4 + 22 * j), name[:32] + ("" if last is None else f"  {last:.2f}"),
               fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    log.info("wrote %s", path)


MISS_LABELS = {"acc_e": "erased, still drawn", "acc_g": "synonyms, still drawn", "acc_s": "kept, lost"}


def miss_list(results) -> str:
    """The concepts behind each number: a line per (count, pipeline) naming what was still drawn or lost."""
    rows = []
    for n, res in results.items():
        for name, m in res.items():
            parts = [f"{MISS_LABELS[k]}: " + ", ".join(f"{c} {v}" for c, v in per.items())
                     for k, per in m.get("misses", {}).items() if per]
            rows.append(f"- {n} erased, {name}: " + ("; ".join(parts) if parts else "nothing missed"))
    return "\n".join(rows)


def parse_miss(entry: str) -> tuple[int, int, str | None]:
    """(cases missed, cases scored, what was drawn instead or None) of a misses entry, "k/n" or "k/n as <class>"."""
    counts, _, drawn = entry.partition(" as ")
    wrong, cases = (int(x) for x in counts.split("/"))
    return wrong, cases, drawn or None


def type_table(results, sp) -> str:
    """Acc_e, Acc_g and Acc_s per concept type, from the per-concept misses: which kind of concept a number is lost
    on (on the mass world a miss list runs to hundreds of names)."""
    types = {c.name: c.concept_type for c in sp.CONCEPTS}
    rows = ["| erased | pipeline | " + " | ".join(f"{t}: e / g / s" for t in sp.CONCEPT_TYPES) + " |",
            "|---:|---|" + "---:|" * len(sp.CONCEPT_TYPES)]
    for n, res in results.items():
        erased = set(sp.ORDER[:n])
        for name, m in res.items():
            miss = m.get("misses")
            if miss is None:
                continue
            # every concept is scored on the same number of cases (seeds x prompts); with no miss at all the
            # shares are 0 whatever it is
            per_case = next((parse_miss(e)[1] for per in miss.values() for e in per.values()), 1)
            cells = []
            for t in sp.CONCEPT_TYPES:
                got = []
                for key in ("acc_e", "acc_g", "acc_s"):
                    names = [c for c, ct in types.items() if ct == t and ((c in erased) != (key == "acc_s"))]
                    if not names:
                        got.append("-")
                        continue
                    wrong = sum(parse_miss(miss[key][c])[0] for c in names if c in miss[key])
                    share = wrong / (per_case * len(names))
                    got.append(f"{share if key != 'acc_s' else 1 - share:.2f}")
                cells.append(" / ".join(got))
            rows.append(f"| {n} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def span_table(span) -> str:
    """concept_world.evaluate.outside_span per count: how much room a linear edit of the text has."""
    return ("Erased concepts' end-token features outside the kept ones' span (mean share):\n\n"
            "| erased | " + " | ".join(str(n) for n in span) + " |\n|---|" + "---:|" * len(span) + "\n"
            "| outside | " + " | ".join(f"{v:.3f}" for v in span.values()) + " |")


def shares_part(a, b) -> bool:
    """Whether two concepts of the world share a drawn part: a colour (the mass world's objects and people are pairs
    of ten), or a pattern or palette (its styles; a palette is named by its ground colour); in the mosaic world, a
    colour in the same cell."""
    if a.shape == "mosaic":
        return bool(set(enumerate(a.colors)) & set(enumerate(b.colors)))
    if a.concept_type == "style":
        return a.shape == b.shape or a.colors[:1] == b.colors[:1]
    return bool(set(a.colors) & set(b.colors))


def neighbours(c, sp, among) -> int:
    """How many concepts named in `among`, of c's type and not c, share a drawn part with c."""
    return sum(shares_part(c, o) for o in sp.CONCEPTS
               if o.concept_type == c.concept_type and o.name != c.name and o.name in among)


def lost_table(results, sp) -> str:
    """Where the kept concepts that are lost go: drawn as an erased concept, as another kept one, or as none, and how
    often what they are drawn as shares a drawn part with them, against the share of their type's other concepts
    that do (chance). From the misses, each lost concept counted by the classifier's most frequent other answer."""
    by_name = {c.name: c for c in sp.CONCEPTS}
    rows = ["| erased | pipeline | kept cases lost | as an erased concept | as a kept one | as none | "
            "sharing a part (chance) |", "|---:|---|---:|---:|---:|---:|---:|"]
    for n, res in results.items():
        erased = set(sp.ORDER[:n])
        for name, m in res.items():
            lost = m.get("misses", {}).get("acc_s")
            if not lost:
                continue
            total, where, share, chance = 0, {"erased": 0, "kept": 0, "none": 0}, 0, 0.0
            for kept, entry in lost.items():
                k, _, drawn = parse_miss(entry)
                total += k
                c = by_name[kept]
                chance += k * neighbours(c, sp, by_name) / (sum(o.concept_type == c.concept_type
                                                                 for o in sp.CONCEPTS) - 1)
                if drawn not in by_name:
                    where["none"] += k
                    continue
                where["erased" if drawn in erased else "kept"] += k
                share += k * shares_part(c, by_name[drawn])
            named = total - where["none"]
            rows.append(f"| {n} | {name} | {total} | {where['erased'] / total:.2f} | {where['kept'] / total:.2f} | "
                        f"{where['none'] / total:.2f} | {share / max(named, 1):.2f} ({chance / total:.2f}) |")
    return "\n".join(rows)


def neighbour_table(results, sp, most: int = 6) -> str:
    """The share of a kept concept's cases lost, by how many erased concepts of its type share a drawn part with it
    (its erased neighbours; `most` and more in the last column), with the number of kept concepts in each cell: a loss
    that grows with the neighbours erased is the edit moving shared parts."""
    rows = ["| erased | pipeline | " + " | ".join(f"{k}{'+' if k == most else ''} erased neighbours"
                                               for k in range(most + 1)) + " |",
            "|---:|---|" + "---:|" * (most + 1)]
    for n, res in results.items():
        erased = set(sp.ORDER[:n])
        for name, m in res.items():
            lost = m.get("misses", {}).get("acc_s")
            if lost is None:
                continue
            cells = {}
            for c in sp.CONCEPTS:
                if c.name in erased:
                    continue
                cell = cells.setdefault(min(most, neighbours(c, sp, erased)), [0, 0])  # cases lost, kept concepts
                cell[0] += parse_miss(lost[c.name])[0] if c.name in lost else 0
                cell[1] += 1
            # every concept is scored on the same number of cases (seeds x prompts)
            per_case = next((parse_miss(e)[1] for e in lost.values()), 1)
            rows.append(f"| {n} | {name} | " + " | ".join(
                f"{cells[k][0] / (per_case * cells[k][1]):.2f} ({cells[k][1]})" if k in cells else "-"
                for k in range(most + 1)) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="standard", choices=list(WORLDS),
                    help="standard: the 20-concept world; mass: the 126-concept world (mass erasure); mosaic: the "
                         "mass world's concepts drawn as codes of many parts")
    ap.add_argument("--counts", default=None, help="erased counts (default: 1,4,8; on the mass world 10,25,50,100)")
    ap.add_argument("--seeds", type=int, default=6, help="sampling seeds per prompt")
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--world-seeds", default=None,
                    help="comma-separated world seeds (instead of --world-seed): each world is measured and the mean "
                         "over the worlds is reported beside; one world is one sample of the recipe")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--no-preserve", dest="preserve", action="store_false",
                    help="do not list the concepts not erased in `preserve` (the generic prior still applies)")
    ap.add_argument("--world-path", default=None, help="a saved world file (default: the cached world of --world-seed)")
    ap.add_argument("--text-width", type=int, default=None,
                    help="a world with other text features' width (a multiple of 32; default: the world's preset's, "
                         "concept_world/train.py PRESETS), trained once and cached")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-grid", dest="grid", action="store_false",
                    help="do not write the before/after picture docs/world_erasure_grid<suffix>.png")
    ap.add_argument("--preservation-target", default="input", choices=["input", "original"],
                    help="Fuse: hold generic prompts and preserved concepts to the refined input or the original "
                         "model")
    ap.add_argument("--refine-strength", type=float, default=None,
                    help="Refine's preservation_strength, when it should differ from Fuse's --strength (the paper's "
                         "code: 1e-4 of it, with --preservation-target original)")
    ap.add_argument("--suffix", default="", help="written as eval_world<suffix>.md / .json")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"],
                    help="the world's architecture (sdxl: CLIP-L + CLIP-G, pooled vector, size conditioning)")
    ap.add_argument("--pooled", default="default", choices=["default", "off", "on", "both"],
                    help="Refine's edit_pooled (SDXL's pooled-vector road): the node's default, off, on, or both")
    ap.add_argument("--pipelines", default=",".join(PIPELINE_ARGS),
                    help="comma-separated subset of " + ", ".join(PIPELINE_ARGS) + " (fewer: a quicker run)")
    ap.add_argument("--timing-only", action="store_true",
                    help="erase and time each stage, score nothing (minutes instead of hours on the mass world)")
    ap.add_argument("--join", default=None,
                    help="comma-separated eval_world JSON files of one world seed (e.g. counts run in parallel "
                         "processes, one thread each): write their joined report, table and plot without measuring")
    args = ap.parse_args()
    unknown = set(args.pipelines.split(",")) - set(PIPELINE_ARGS)
    if unknown:
        ap.error(f"--pipelines: unknown {sorted(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.join:
        paths = args.join.split(",")
        measured = json.loads(Path(paths[0]).read_text())["settings"]
        for key in ("world", "seeds", "steps", "lr", "images", "strength", "lam", "preserve", "timing_only"):
            setattr(args, key, measured.get(key, getattr(args, key)))  # the report says what was measured
        mods = boot()  # the world's spec names each concept's type for the per-type table
        write(args, mods["spec"].named(args.world), *joined(paths))
        return
    torch.set_num_threads(args.threads)
    mods = boot()
    w = mods["world"]
    world_seeds = [int(x) for x in args.world_seeds.split(",")] if args.world_seeds else [args.world_seed]
    if len(world_seeds) > 1 and args.world_path:
        ap.error("--world-seeds measures the cached worlds of those seeds, not --world-path")
    preset, default_counts = WORLDS[args.world]
    if args.world != "standard" and args.family != "sd15":
        ap.error(f"--world {args.world} is measured in the SD1.5 architecture")
    counts = [int(c) for c in (args.counts or default_counts).split(",")]
    per_world, stage_times, spans = {}, {}, {}
    for ws in world_seeds:
        if args.world_path:
            world = w.load(args.world_path)
        elif args.family == "sdxl":
            world = w.load_or_train(ws, family="sdxl")
        else:
            world = w.load_or_train(ws, preset, text_width=args.text_width)
        results = per_world[ws] = {}
        stage_times[ws] = {}
        if args.world != "standard":
            with torch.inference_mode():
                spans[ws] = mods["evaluate"].outside_span(world, counts)
        for n in counts:
            results[n], models, stage_times[ws][n] = run(mods, world, n, args)
            log.info("\nworld seed %d\n%s\n%s\n%s", ws, table({n: results[n]}), miss_list({n: results[n]}),
                     time_table({n: stage_times[ws][n]}))
            ee = mods["erasure_eval"]
            if args.grid and ws == world_seeds[0] and n == max(counts) and {ee.ORIGINAL, ee.MACE} <= chosen(ee, args):
                mace = next(m for name, m in models.items() if name.startswith(ee.MACE))
                grid(mods, world, list(world.spec.ORDER[:n]), models[ee.ORIGINAL], mace,
                     Path(str(GRID).format(args.suffix)))
    write(args, world.spec, world_seeds, counts, per_world, stage_times, spans)


def joined(paths) -> tuple[list, list, dict, dict, dict]:
    """(world seeds, counts, per-world results, stage seconds, spans) of several runs' JSON files of one world seed
    (e.g. counts measured in parallel processes), as one run's."""
    per_world, stage_times, spans, seeds = {}, {}, {}, set()
    for path in paths:
        got = json.loads(Path(path).read_text())
        if "mean" in got["results"]:
            raise SystemExit(f"--join: {path} holds several worlds; join runs of one world seed")
        ws = got["settings"]["world_seed"]
        seeds.add(ws)
        per_world.setdefault(ws, {}).update({int(n): r for n, r in got["results"].items()})
        for n, t in got["seconds"][str(ws)].items():
            stage_times.setdefault(ws, {})[int(n)] = t
        for n, share in got.get("span", {}).get(str(ws), {}).items():  # files from before it have none
            spans.setdefault(ws, {})[int(n)] = share
    if len(seeds) != 1:
        raise SystemExit(f"--join: the files measure world seeds {sorted(seeds)}; join runs of one world seed")
    ws = seeds.pop()
    per_world[ws] = dict(sorted(per_world[ws].items()))
    stage_times[ws] = dict(sorted(stage_times[ws].items()))
    spans = {ws: dict(sorted(spans[ws].items()))} if ws in spans else {}
    return [ws], list(per_world[ws]), per_world, stage_times, spans


def write(args, spec, world_seeds, counts, per_world, stage_times, spans=None):
    """bench/out/eval_world<suffix>.md and .json, the mass world's plot, and the table on stdout. The plot goes to
    docs/ only for a whole run (no suffix, or "_<world>"); a part of one (a suffix of a run to --join) keeps it in
    bench/out."""
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "join")}
    if len(world_seeds) == 1:
        results = per_world[world_seeds[0]]
        report = (f"{table(results)}\n\nSeconds per stage:\n\n{time_table(stage_times[world_seeds[0]])}\n\n"
                  f"Per concept type (Acc_e / Acc_g / Acc_s):\n\n{type_table(results, spec)}\n\n"
                  f"Where the kept concepts lost go:\n\n{lost_table(results, spec)}\n\n"
                  f"Kept cases lost by erased neighbours (kept concepts in the cell):\n\n"
                  f"{neighbour_table(results, spec)}\n\n"
                  f"Per concept (cases out of seeds):\n\n{miss_list(results)}\n")
        if spans:
            report = f"{span_table(spans[world_seeds[0]])}\n\n{report}"
        stored = results
    else:
        results = mean_over_worlds(per_world)
        report = f"Mean over world seeds {world_seeds} (H: mean of the worlds' H; range beside):\n\n" \
                 f"{table(results, spread=True)}\n"
        for ws, res in per_world.items():
            report += f"\nWorld seed {ws}:\n\n{table(res)}\n\nPer concept (cases out of seeds):\n\n{miss_list(res)}\n"
        stored = {"mean": results, "worlds": per_world}
    (out / f"eval_world{args.suffix}.json").write_text(
        json.dumps({"settings": settings, "results": stored, "seconds": stage_times, "span": spans or {}}, indent=1))
    if args.world != "standard" and len(counts) > 1 and not args.timing_only:
        path = Path(str(PLOT).format(args.world))
        plot(results, path if args.suffix in ("", f"_{args.world}") else out / f"{path.stem}{args.suffix}.png",
             f"{args.world} world ({len(spec.CONCEPTS)} concepts), world seed "
             f"{world_seeds[0] if len(world_seeds) == 1 else world_seeds}, "
             f"{args.seeds} sampling seeds, " + ("the nodes' defaults (per type, the paper's)"
                                                 if (args.lr, args.steps) == (1e-4, 50) else
                                                 f"lr {args.lr:g}, {args.steps} steps"))
    (out / f"eval_world{args.suffix}.md").write_text(f"{report}\nSettings: {settings}\n")
    if args.timing_only:
        print(time_table(stage_times[world_seeds[0]]))
    else:
        print(table(results, spread=len(world_seeds) > 1))  # the bench's report


if __name__ == "__main__":
    main()
