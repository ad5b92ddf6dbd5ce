"""Refine and fuse against training, every part at Stable Diffusion 1.5's size, on this machine.

The mass world's cost figure ((refine + fuse) / train, docs/mass_world.md) is set by that toy: its LoRAs train on
8x8 latents (about a second a concept), while its preserve list still goes through a text encoder as 77-token
prompts. This bench puts every stage at SD1.5's size on the machine it runs on and prints the same ratio for the
mass world's lists (erase N of 126 concepts, celebrity, object and style in turn; preserve the rest):

- a prompt: the pack's ClipEncoder (the nodes' batching) over ComfyUI's CLIP-L, real architecture, random weights;
- a training step: the pack's Train (train_concept_loras) on ComfyUI's SD1.5 UNet (its real config, random
  weights) at 64x64 latents, given one image: a run of --steps-b steps minus one of --steps-a, per step, so loading
  and masks cancel out;
- Train's own images: images_per_concept x GEN_STEPS sampler forwards at classifier-free guidance's batch of 2 per
  image, estimated from one such forward;
- refine and fuse themselves: mace_core on SD1.5's 32 key/value matrices with a synthetic encoder of CLIP-L's shape
  (bench/_common.py), which counts the prompts they encode (fuse reuses refine's preserve list through the encoder's
  memo, as the nodes' encoder does) and whose own time is left out ("solve").

The ratio's two sides are measured in the same run. "steps only" leaves Train's image making out (a lower bound on
its time, so an upper bound on the ratio).

    python bench/bench_cost.py --threads 2
    python bench/bench_cost.py --counts 10,100 --threads 1
"""

import argparse
import asyncio
import json
import logging
import sys
import time

import torch
from _common import ROOT, SyntheticEncoder, load_core, make_loras, prior, sd15_weights

OUT = ROOT / "bench" / "out"
log = logging.getLogger("bench")
WORLD = 126  # the mass world's concepts (concept_world/mass.py)
TYPES = ("celebrity", "object", "style")  # the mass world's person, object and style, in its erasure order

# comfy.model_detection's SD1.x UNet config at SD1.5's size
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def boot():
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import comfy_host

    if not comfy_host.available():
        raise SystemExit(f"needs a ComfyUI host (COMFYUI_PATH or {comfy_host.HOST})")
    comfy_host.boot()
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT))), "the pack failed to load"
    pkg = str(ROOT).replace(".", "_x_")
    return comfy_host, sys.modules[pkg + ".nodes.host"], sys.modules[pkg + ".nodes.train"], \
        sys.modules[pkg + ".nodes.attention"]


def sd15_parts(comfy_host):
    """ComfyUI's SD1.5 MODEL and CLIP-L at their real sizes, random weights (seeded)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.supported_models_base import ClipTarget

    conf = comfy.supported_models.SD15(dict(SD15_UNET))
    conf.set_inference_dtype(torch.float32, None)
    model = conf.get_model({})
    comfy_host._init_(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float32})
    comfy_host._init_(clip.cond_stage_model, 1, std=0.02)
    return patcher, clip


def names(n):
    return [f"Vorname{i:03d} Nachname{i:03d}" for i in range(n)]


def prompt_rate(host, clip, n=96):
    enc = host.ClipEncoder(clip)
    prompts = [f"a photo of {name}" for name in names(n)]
    enc.encode(prompts[:32])  # warm-up
    t0 = time.perf_counter()
    enc.encode(prompts)
    return (time.perf_counter() - t0) / n


def step_time(train, patcher, clip, steps_a, steps_b):
    latents = {"samples": torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))}

    def run(steps):
        t0 = time.perf_counter()
        train.train_concept_loras(patcher, clip, "Vorname Nachname", "celebrity", steps=steps, latents=latents,
                                  settings="custom")
        return time.perf_counter() - t0

    run(1)  # warm-up: kernels, allocator
    return (run(steps_b) - run(steps_a)) / (steps_b - steps_a)


def forward_time(patcher):
    """One sampler forward at 64x64 with classifier-free guidance's batch of two."""
    model = patcher.model
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    sigma = torch.full((2,), 5.0)
    with torch.inference_mode():
        model.apply_model(x, sigma, c_crossattn=ctx)
        t0 = time.perf_counter()
        model.apply_model(x, sigma, c_crossattn=ctx)
        return time.perf_counter() - t0


def stage_costs(n):
    """(prompts encoded, solve seconds) of refine then fuse, erasing n of the mass world's list, the rest preserved."""
    core = load_core()
    C = core.concepts
    everyone = [(name, TYPES[i % 3]) for i, name in enumerate(names(WORLD))]
    items = [C.Concept(name, C.DEFAULT_ANCHORS[t], t) for name, t in everyone[:n]]
    kept = [C.Preserved(name, t) for name, t in everyone[n:]]
    w0, wp = sd15_weights("cpu")
    c = prior("cpu")
    loras = make_loras(core, items, w0)
    enc = SyntheticEncoder("cpu")
    enc.memo = {}  # as host.ClipEncoder: fuse reuses refine's preserve moment
    t0 = time.perf_counter()
    core.refine.refine(items, enc, wp, c, kept, prior_weight=1.0, lam=0.01)
    core.fuse.fuse(loras, enc, wp, w0, c, kept, prior_weight=1.0, lam=0.01, device="cpu")
    return enc.prompts, time.perf_counter() - t0 - enc.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,25,50,100", help="concepts erased, of the mass world's 126")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps-a", type=int, default=2, help="the shorter training run")
    ap.add_argument("--steps-b", type=int, default=4, help="the longer training run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.counts.split(",")]

    comfy_host, host, train, attention = boot()
    core = load_core()
    patcher, clip = sd15_parts(comfy_host)
    rate = prompt_rate(host, clip)
    log.info("CLIP-L: %.4f s a prompt", rate)
    fwd = forward_time(patcher)
    log.info("SD1.5 UNet: %.2f s a sampler forward (batch 2)", fwd)
    step = step_time(train, patcher, clip, args.steps_a, args.steps_b)
    log.info("SD1.5 UNet: %.2f s a training step", step)
    images = train.TrainRequest.images_per_concept  # the node's default
    image_s = images * attention.GEN_STEPS * fwd  # per concept

    rows = []
    for n in counts:
        prompts, solve = stage_costs(n)
        steps = sum(core.concepts.PRESETS[TYPES[i % 3]].steps for i in range(n))
        stages = prompts * rate + solve
        train_s = steps * step
        rows.append({"erased": n, "prompts": prompts, "encode_s": prompts * rate, "solve_s": solve,
                     "train_steps_s": train_s, "images_s": n * image_s,
                     "ratio_steps": stages / train_s, "ratio_all": stages / (train_s + n * image_s)})
        log.info("%d erased: %s", n, rows[-1])

    lines = [f"Per prompt {rate * 1e3:.1f} ms (CLIP-L), per training step {step:.2f} s, per sampler forward "
             f"{fwd:.2f} s (SD1.5 UNet, 64x64), {torch.get_num_threads()} thread(s), {torch.__version__}.", "",
             "| erased | prompts encoded | encode s | solve s | train steps s | its images s "
             "| (refine + fuse) / train steps | / train with images |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['erased']} | {r['prompts']} | {r['encode_s']:.0f} | {r['solve_s']:.1f} | "
                     f"{r['train_steps_s']:.0f} | {r['images_s']:.0f} | {100 * r['ratio_steps']:.1f} % | "
                     f"{100 * r['ratio_all']:.1f} % |")
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cost.md").write_text(text + "\n")
    (OUT / "cost.json").write_text(json.dumps({"rate": rate, "step": step, "forward": fwd, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
