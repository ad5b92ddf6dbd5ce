"""Memory of one MACE training step on a full-size UNet (issue 15: SDXL at 1024 px must fit in 24 GB of GPU memory).

One concept's LoRA step as the Train node runs it (nodes/attention.ConceptTask: the attention loss through every
cross-attention layer, backward, AdamW), on a random UNet with the real SDXL (or SD1.5) layout, at several latent
sizes. For each size it reports the bytes autograd keeps for the backward pass (the step's activation memory, the
same on any device) and, on a GPU, the allocator's peak over the loaded weights; on a CPU, the process's peak RSS over
the loaded weights.

Activation memory grows linearly with the latent's pixels (the attention runs through PyTorch's SDPA, whose memory is
linear in tokens), so a line fitted to small latents on a CPU predicts 1024 px: the report prints the fit, how far
the largest measured size sits from it, and the predicted peak at the target size (weights in their stored dtype, the
step computing in float32, as TrainableModel makes fp16/fp8 models do).

    python bench/bench_train_memory.py                        # SDXL layout, fp16 weights, latents 16, 24, 32, CPU
    python bench/bench_train_memory.py --sizes 64,96,128      # on a GPU: 1024 px measured, not predicted
    python bench/bench_train_memory.py --model sd15 --target 64
"""

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "host"))
from _common import peak_rss, reset_peak_rss  # noqa: E402
from bench_train import start_pack, sync  # noqa: E402
from bench_train_batch import build  # noqa: E402

log = logging.getLogger("bench")
GIB = 2**30
BUDGET_GIB = 24  # issue 15: a 24 GB card


def fit_line(xs, ys):
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def step(att, core, tm, prompts, shapes, s, dev):
    """One training step of one concept at latent side s: (bytes saved for backward, peak bytes over the start or
    None, seconds)."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, s, s, generator=g)
    up, down = core.init_lora(shapes, 1, torch.Generator().manual_seed(0), device=tm.device)
    up = {k: u[None].detach().requires_grad_(True) for k, u in up.items()}  # a batch of one concept
    down = {k: d[None].detach().requires_grad_(True) for k, d in down.items()}
    task = att.BatchTask(tm, [att.ConceptData(prompts, lat, torch.ones(1, s, s), "importance")], up, down)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4, weight_decay=0.01)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base, hwm = psutil.Process().memory_info().rss, reset_peak_rss()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = task.losses(0, [torch.Generator().manual_seed(0)]).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
    opt.step()
    sync(dev)
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (peak_rss() - base) if hwm else None
    return tm.copies.kept_bytes, peak, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("sd15", "sdxl"), default="sdxl")
    ap.add_argument("--sizes", default="16,24,32", help="latent sides to measure (pixels / 8)")
    ap.add_argument("--target", type=int, default=128, help="latent side to predict (SDXL's 1024 px: 128)")
    ap.add_argument("--fp32", action="store_true", help="weights stored in float32 (default: fp16, as checkpoints are)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="steps per size and mode; the time reported is their median (memory: the first step's)")
    args = ap.parse_args()
    mods = start_pack(args.threads)
    if mods is None:
        return
    import comfy.model_management as mm

    att, host, core = mods["nodes.attention"], mods["nodes.host"], mods["mace_core.train"]
    dtype = torch.float32 if args.fp32 else torch.float16
    with torch.inference_mode():  # as the executor builds a checkpoint's weights
        model, clip = build(args.model, dtype)
    dev = torch.device(mm.get_torch_device())
    keys = host.cross_attention_keys(model, clip)
    concept = mods["mace_core.concepts"].parse_concepts("Claude Monet", "celebrity")[0]
    with torch.inference_mode():
        prompts = att.concept_prompts(clip, concept, ["a photo of {}"], host.clip_encoder(clip).end_id)
    shapes = {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}
    unet = model.model.diffusion_model
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {"kept": [], "remade": []}  # weight copies kept for backward (before) or remade there (the Train node)
    with torch.inference_mode(False), torch.enable_grad():
        tm = att.TrainableModel(model, keys)
        try:
            tm.load()
            for s in sizes:
                for mode in rows:
                    tm.copies.enabled = mode == "remade"
                    runs = [step(att, core, tm, prompts, shapes, s, dev) for _ in range(args.repeats)]
                    rows[mode].append((s, runs[0][0], runs[0][1], statistics.median(r[2] for r in runs)))
        finally:
            with torch.inference_mode():
                tm.release()

    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {args.threads} thread(s)"
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"\nMACE training step memory: {args.model} UNet layout ({n_params / 1e9:.2f} B params, "
          f"{len(keys) // 2} cross-attention layers), weights {str(dtype).replace('torch.', '')} "
          f"({weight_bytes / GIB:.2f} GiB), compute float32, batch 1, {where}")
    print(f"{'latent':>8}{'pixels':>8}{'copies':>8}{'saved for backward GiB':>24}{'peak over start GiB':>21}"
          f"{'s/step':>8}")
    for mode, got in rows.items():
        for s, saved, peak, seconds in got:
            peak_s = f"{peak / GIB:.3f}" if peak is not None else "-"
            print(f"{s:>8}{8 * s:>8}{mode:>8}{saved / GIB:>24.3f}{peak_s:>21}{seconds:>8.1f}")
    for s, (k, r) in zip(sizes, zip(rows["kept"], rows["remade"])):
        print(f"latent {s}: saved for backward {r[1] / k[1]:.3f}x of keeping the copies, step time {r[3] / k[3]:.2f}x")
    got = rows["remade"]
    px = [s * s for s, *_ in got]
    a_saved, b_saved = fit_line(px, [saved for _, saved, _, _ in got])
    if len(got) >= 3:
        worst = max(abs(a_saved + b_saved * x - r[1]) / r[1] for x, r in zip(px, got))
        print(f"linear in pixels: saved = {a_saved / GIB:.3f} GiB + {b_saved * 4096 / GIB:.4f} GiB per 64x64 latent "
              f"pixels; largest miss of the fit {100 * worst:.1f} %")
    t = args.target * args.target
    if args.target in sizes:
        s_, saved, peak, _ = next(r for r in got if r[0] == args.target)
        step_bytes, how = (peak if peak is not None else saved), "measured"
    else:
        step_bytes, how = a_saved + b_saved * t, "predicted from the line (bytes saved for backward)"
    total = weight_bytes + step_bytes
    print(f"latent {args.target} ({8 * args.target} px), {how}: weights {weight_bytes / GIB:.2f} GiB + step "
          f"{step_bytes / GIB:.2f} GiB = {total / GIB:.2f} GiB against a {BUDGET_GIB} GiB card "
          f"({total / (BUDGET_GIB * GIB):.2f}x of it)")


if __name__ == "__main__":
    main()
