"""The concept world's decoder phase, float32 against bf16 autocast, on this CPU: why bf16 is used only where the CPU
has bf16 instructions (concept_world/cpu.py). Without them (AVX2 only) torch emulates bf16, about 20x slower.

    python bench/bench_world_precision.py             # 20 decoder steps each way, batch 32, interleaved
    python bench/bench_world_precision.py --steps 5   # quicker
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/bench_world_precision.py   # as an AVX2-only CPU

Prints seconds per step each way and the ratio bf16 / float32 measured in the same run, and what concept_world
would pick here.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "world"))
from world_support import comfy_host, pack_import  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two modes (noise evens out)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy_host.boot()
    ae, cpu, render, train = (pack_import(f"concept_world.{m}") for m in ("autoencoder", "cpu", "render", "train"))
    picked = cpu.describe()
    seconds = {"bf16": 0.0, "float32": 0.0}
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(args.rounds):
            for mode, flag in (("float32", "0"), ("bf16", "1")):
                os.environ["MACE_CPU_BF16"] = flag
                cpu.native_bf16.cache_clear()
                g = torch.Generator().manual_seed(0)
                taesd = ae.build_taesd(g)
                t0 = time.perf_counter()
                ae.train_decoder(taesd, lambda n: render.render(train.sample_targets(g, n), g)[0], args.steps, g,
                                 batch=args.batch)
                seconds[mode] += time.perf_counter() - t0
    os.environ.pop("MACE_CPU_BF16", None)
    cpu.native_bf16.cache_clear()
    n = args.steps * args.rounds
    per = {m: s / n for m, s in seconds.items()}
    print(f"decoder step, batch {args.batch}, {torch.get_num_threads()} thread(s): float32 {per['float32']:.3f} s, "
          f"bf16 autocast {per['bf16']:.3f} s, bf16 / float32 = {per['bf16'] / per['float32']:.2f}x")
    print(f"concept_world picks here: {picked}")
    print(json.dumps({"float32_s": per["float32"], "bf16_s": per["bf16"], "ratio": per["bf16"] / per["float32"],
                      "native_bf16": cpu.native_bf16()}))


if __name__ == "__main__":
    main()
