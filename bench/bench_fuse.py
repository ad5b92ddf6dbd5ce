"""Fuse (MACE stage 3) of 1, 10 and 100 rank-1 LoRAs on SD1.5-sized cross-attention layers.

Ours: mace_core.fuse.fuse, which streams one d x d Gram matrix per concept into an (out, d) accumulator per matrix
(dW_i G_i = up_i (down_i G_i)) and factorises one d x d system for all 32 matrices.
Reference: the per-matrix formulation a naive implementation would write: for every matrix, stack every concept's
token contexts with targets (W' + dW_i) e (forming each full dW_i), the prior and the ridge rows, and solve least
squares for that matrix.

Synthetic weights (W0, a perturbed W') and synthetic token features of real shape (30 prompts x 77 tokens x 768 per
concept, generated per prompt from a seed, so ours streams them and the reference stacks the same ones); no model
is loaded. Times and peak memory of each side come from the same run on the same device; compare ratios.

    python bench/bench_fuse.py                        # CPU: reference timed on a few matrices and scaled to 32
    python bench/bench_fuse.py --ref-layers 0         # reference on all 32 matrices (use a GPU for 100)
"""

import argparse
import json
import logging
import os
import tempfile

import torch
from _common import (
    CTX,
    WIDTHS,
    D,
    SyntheticEncoder,
    add_device_args,
    load_core,
    make_loras,
    prior,
    run_child,
    sd15_weights,
    start,
    timed_peak,
)
from safetensors.torch import load_file, save_file

log = logging.getLogger("bench")


def concepts(core, n):
    return [core.concepts.Concept(f"concept number {i}", "a person", "celebrity") for i in range(n)]


def ours(core, loras, enc, w0, wp, c):
    return core.fuse.fuse(loras, enc, wp, w0, c, (), prior_weight=1.0, lam=0.01, device=enc.device)


def reference(core, loras, enc, w0, wp, c, layers=None):
    """Per matrix: stack contexts and targets of every concept, prior and ridge rows; least squares (float32)."""
    xs = [enc.encode(core.fuse.concept_of(lora).prompts())[1].reshape(-1, D) for lora in loras]
    x = torch.cat(xs)
    n = x.shape[0]
    trace = float(x.pow(2).sum(dtype=torch.float64))
    prior_rows = torch.linalg.cholesky(n * c).T.float()  # rows whose Gram is the weighted prior
    ridge = (0.01 * trace / D) ** 0.5 * torch.eye(D, device=x.device)
    rows = torch.cat([x, prior_rows, ridge])
    out = {}
    for k in list(wp)[:layers]:
        targets = [xi @ (wp[k] + lora.delta(k).to(xi.device)).T for xi, lora in zip(xs, loras)]
        targets += [prior_rows @ wp[k].T, ridge @ wp[k].T]  # prior held to the input, as fuse() does by default
        out[k] = torch.linalg.lstsq(rows, torch.cat(targets)).solution.T - wp[k]
    return out


def measure(which, n, layers, device):
    """Run one side once: seconds, peak extra memory over the inputs, and a sample of the result (first 2 matrices).
    CUDA: the allocator's own peak. CPU: peak RSS over the RSS once the inputs exist, which is only meaningful in a
    fresh process (see run_isolated)."""
    core = load_core()
    enc = SyntheticEncoder(device)
    w0, wp = sd15_weights(device)
    c = prior(device)
    loras = make_loras(core, concepts(core, n), w0, device)
    if which == "ours":
        fn = lambda: ours(core, loras, enc, w0, wp, c)
        ours(core, loras[:1], enc, w0, wp, c)  # warm-up (kernels, allocator, libraries)
    else:
        fn = lambda: reference(core, loras, enc, w0, wp, c, layers)
        reference(core, loras[:1], enc, w0, wp, c, 1)
    result, dt, peak = timed_peak(fn, device)
    sample = {k: v.cpu() for k, v in list(result.items())[:2]}
    return dt, peak, sample


def run_isolated(which, n, layers, device, threads):
    """CPU: each measurement in a fresh interpreter, with glibc returning large blocks to the system at once, so the
    peak RSS belongs to that measurement alone (a forked or reused process recycles freed pages and hides it)."""
    if device.type == "cuda":
        return measure(which, n, layers, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sample.safetensors")
        meta = run_child([__file__, "--one", which, "--counts", n, "--ref-layers", layers or 0, "--device", "cpu",
                          "--out", out], threads)
        return meta["seconds"], meta["peak"], load_file(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,10,100")
    ap.add_argument("--ref-layers", type=int, default=None,
                    help="time the reference on this many matrices and scale to 32 (0 = all; default: all on a GPU, "
                         "2 on CPU)")
    add_device_args(ap)
    ap.add_argument("--one", choices=["ours", "ref"], help=argparse.SUPPRESS)  # child mode of run_isolated
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = start(args)
    layers = args.ref_layers if args.ref_layers is not None else (0 if device.type == "cuda" else 2)
    layers = layers or None
    if args.one:
        dt, peak, sample = measure(args.one, int(args.counts), layers, device)
        save_file({k: v.contiguous() for k, v in sample.items()}, args.out)
        print(json.dumps({"seconds": dt, "peak": peak}))
        return
    rows = []
    for n in [int(x) for x in args.counts.split(",")]:
        t_o, m_o, s_o = run_isolated("ours", n, layers, device, args.threads)
        t_r, m_r, s_r = run_isolated("ref", n, layers, device, args.threads)
        if layers:
            t_r *= 2 * len(WIDTHS) / layers
        agree = max(float((s_o[k] - s_r[k]).norm() / s_r[k].norm()) for k in s_r)
        rows.append((n, t_o, t_r, m_o, m_r, agree))
        log.info("  %d LoRAs: ours %.2fs, reference %.2fs", n, t_o, t_r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log.info("device: %s; %d matrices (SD1.5 to_k/to_v), d=%d, %d tokens per concept", name, 2 * len(WIDTHS), D,
             30 * CTX)
    log.info("%6s %10s %13s %9s %12s %12s %16s", "LoRAs", "ours s", "reference s", "ratio", "ours MiB", "ref MiB",
             "ours vs ref")
    for n, t_o, t_r, m_o, m_r, agree in rows:
        log.info("%6d %10.3f %13.3f %8.1fx %12.1f %12.1f %16.1e", n, t_o, t_r, t_r / t_o, m_o / 2**20, m_r / 2**20,
                 agree)
    if layers:
        log.info("(reference timed on %d of %d matrices and scaled; its peak memory is per matrix, which a sequential "
                 "solve does not exceed)", layers, 2 * len(WIDTHS))
    log.info("peak memory: extra over the inputs (%s); ours vs ref: relative difference of the updates (the reference "
             "solves in float32)", "CUDA allocator" if device.type == "cuda" else "process RSS, fresh process each")


if __name__ == "__main__":
    main()
