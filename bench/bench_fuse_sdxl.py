"""Fuse (MACE stage 3) memory on SDXL's shapes: 140 cross-attention key/value matrices reading a 2048-wide context.

The goal (issue 15, fault 4): fusing 100 rank-1 LoRAs peaks at most 1.5 GB beyond the model's weights. The weights
(fp16, 0.68 GB for SDXL's to_k/to_v), the LoRAs and the prior exist before the measurement starts; the peak counts
everything fuse() allocates, its result included (the deltas in the dtype they are patched in).

Synthetic weights and token features of real shape (30 prompts x 77 tokens x 2048 per concept), no model loaded;
each count is measured in a fresh process (see _common.run_child).

    python bench/bench_fuse_sdxl.py                   # 1, 10, 100 LoRAs on the CPU
    python bench/bench_fuse_sdxl.py --counts 100 --device cuda
"""

import argparse
import json
import logging
import time
import zlib

import torch
from _common import CTX, END, START, add_device_args, load_core, run_child, start, sync, timed_peak

log = logging.getLogger("bench")

D = 2048
# SDXL's transformer blocks with cross-attention, by inner width: input level 2 (2 x depth 2 at 640), input level 3
# (2 x 10 at 1280), middle (10 at 1280), output level 3 (3 x 10 at 1280), output level 2 (3 x 2 at 640).
WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 10 + [1280] * 30 + [640] * 6
GOAL = 1.5 * 2**30


class WideEncoder:
    """mace_core.text.TextEncoder of SDXL's shape (clip_l + clip_g = 2048 wide): one id per word, features seeded by
    the prompt, a shared part as real prompts share start and padding tokens."""

    end_id, context_length, dim = END, CTX, D

    def __init__(self, device):
        self.device = device
        self.shared = torch.randn(CTX, D, generator=torch.Generator().manual_seed(7)).to(device)

    def token_count(self, text):
        return len(text.split())

    def encode(self, prompts):
        feats = torch.empty(len(prompts), CTX, D, device=self.device)
        for i, p in enumerate(prompts):
            g = torch.Generator(self.device).manual_seed(zlib.crc32(p.encode()))
            feats[i] = self.shared + torch.randn(CTX, D, generator=g, device=self.device)
        words = [[zlib.crc32(w.encode()) % 49000 + 1 for w in p.split()][:CTX - 2] for p in prompts]
        return [[START] + w + [END] * (CTX - 1 - len(w)) for w in words], feats


def sdxl_inputs(core, n, device):
    g = torch.Generator().manual_seed(1)
    keys = [f"diffusion_model.block{i}.attn2.to_{kv}.weight" for i in range(len(WIDTHS)) for kv in "kv"]
    widths = [w for w in WIDTHS for _ in range(2)]
    w0 = {k: (torch.randn(w, D, generator=g) / D**0.5).half().to(device) for k, w in zip(keys, widths)}
    p = torch.randn(4000, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prior = (p.T @ p / p.shape[0]).to(device)
    loras = []
    for i in range(n):
        up = {k: (torch.randn(w.shape[0], 1, generator=g) * 0.05).to(device) for k, w in w0.items()}
        down = {k: (torch.randn(1, D, generator=g) / D**0.5).to(device) for k in w0}
        loras.append(core.lora_bundle.ConceptLoRA(f"concept number {i}", "a person", "celebrity", 1, 50, up, down))
    return w0, prior, loras


def measure(n, device):
    core = load_core()
    enc = WideEncoder(device)
    w0, prior, loras = sdxl_inputs(core, n, device)
    kwargs = dict(prior_weight=1.0, lam=0.01, device=device)
    if "out_dtype" in core.fuse.fuse.__code__.co_varnames:
        kwargs["out_dtype"] = torch.float16  # what the node asks for an fp16 model: the patch dtype
    # W' = W0 here (a refined model differs only by its patches). No warm-up: memory, not speed, is measured here.
    sync(device)
    t0 = time.perf_counter()
    result, seconds, peak = timed_peak(lambda: core.fuse.fuse(loras, enc, w0, w0, prior, (), **kwargs), device)
    dtype = str(next(iter(result.values())).dtype)
    result_bytes = sum(v.numel() * v.element_size() for v in result.values())
    return {"seconds": seconds, "peak": peak, "result": result_bytes, "dtype": dtype,
            "weights": sum(w.numel() * w.element_size() for w in w0.values()), "wall": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,10,100")
    add_device_args(ap)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one count, JSON on the last line
    args = ap.parse_args()
    device = start(args)
    if args.one:
        print(json.dumps(measure(args.one, device)))
        return
    rows = []
    for n in [int(x) for x in args.counts.split(",")]:
        if device.type == "cuda":
            rows.append((n, measure(n, device)))
        else:
            rows.append((n, run_child([__file__, "--one", n, "--device", "cpu"], args.threads)))
        log.info("  %d LoRAs: %.1fs, peak %.0f MiB", n, rows[-1][1]["seconds"], rows[-1][1]["peak"] / 2**20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log.info("device: %s; %d matrices (SDXL to_k/to_v, %.0f MiB in fp16), d=%d, %d tokens per concept", name,
             2 * len(WIDTHS), rows[0][1]["weights"] / 2**20, D, 30 * CTX)
    log.info("%6s %9s %12s %12s %8s %6s", "LoRAs", "seconds", "peak MiB", "result MiB", "dtype", "goal")
    for n, r in rows:
        log.info("%6d %9.1f %12.0f %12.0f %8s %6s", n, r["seconds"], r["peak"] / 2**20, r["result"] / 2**20,
                 r["dtype"].replace("torch.", ""), "ok" if r["peak"] <= GOAL else "over")
    log.info("peak: memory beyond the weights, LoRAs and prior while fuse() ran, its result included (%s)",
             "CUDA allocator" if device.type == "cuda" else "process RSS, fresh process each")


if __name__ == "__main__":
    main()
