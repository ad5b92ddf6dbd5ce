"""What Train's image settings cost: the time to draw one concept's training images (`images_per_concept` of them,
in one sampler run for a batch of concepts, as the node runs it) at the node's defaults (the paper's 30 dpmpp_2m
steps at guidance 7.5) against KSampler's 20 euler steps at 7, Train's default before, measured in the same run and
printed as a ratio (compare ratios, not seconds).

    python bench/bench_images.py                          # tiny real SD1.x UNet, CPU, 64 px, 1 thread
    python bench/bench_images.py --model sd15 --size 64   # SD1.5-sized random UNet at 512 px (use a GPU)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "host"))
from bench_train import build, start_pack, sync  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--size", type=int, default=8, help="latent side (pixels / 8)")
    ap.add_argument("--concepts", type=int, default=4, help="concepts drawn in one sampler run")
    ap.add_argument("--images", type=int, default=8, help="images per concept (the node's default)")
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions per setting (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    mods = start_pack(args.threads)
    if mods is None:
        return
    import comfy.model_management as mm

    att = mods["nodes.attention"]
    with torch.inference_mode():
        model, clip = build(args.model == "sd15", torch.float32)
    dev = mm.get_torch_device()
    texts = [f"a photo of Person Number {i}" for i in range(args.concepts)]
    settings = {"before: 20 euler steps, cfg 7": att.ImageSampling(20, 7.0, "euler", "normal"),
                "default: the paper's 30 dpmpp_2m steps, cfg 7.5": att.ImageSampling()}
    seconds = {}
    with torch.inference_mode():
        att.generate_latents_batch(model, clip, texts[:1], 1, 8 * args.size, [0])  # warm-up: loads the model
        for _ in range(args.rounds):  # interleaved, so a slow spell of a noisy machine hits both alike
            for name, s in settings.items():
                sync(dev)
                t0 = time.perf_counter()
                att.generate_latents_batch(model, clip, texts, args.images, 8 * args.size,
                                           list(range(len(texts))), sampling=s)
                sync(dev)
                seconds.setdefault(name, []).append((time.perf_counter() - t0) / len(texts))
    where = torch.cuda.get_device_name() if torch.device(dev).type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\nTrain's images per concept: {args.model} UNet, {8 * args.size} px, {args.images} images, "
          f"{args.concepts} concepts a run, {where}; median of {args.rounds}")
    base = statistics.median(seconds[next(iter(settings))])
    print(f"{'setting':<50}{'s/concept':>11}{'x before':>10}")
    for name, ts in seconds.items():
        t = statistics.median(ts)
        print(f"{name:<50}{t:>11.3f}{t / base:>10.2f}")


if __name__ == "__main__":
    main()
