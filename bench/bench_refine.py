"""Refine (MACE stage 1) at 1, 10 and 100 concepts on SD1.5-sized cross-attention layers.

Prints, per concept count: the text-encoding time (the measured per-prompt rate of a CLIP-L-architecture encoder
through ComfyUI, times the prompts the count needs),
our solve (stream d x d statistics, one Cholesky for all 32 matrices) and the per-layer reference (stack every
context and target, one solve per matrix, as the paper's code does), their ratio, and peak memory of each solve.
All figures of one run come from the same process on the same machine; compare ratios, not seconds.

    python bench/bench_refine.py                     # on the GPU when there is one
    python bench/bench_refine.py --ref-layers 4      # CPU: time the reference on 4 matrices and scale
"""

import argparse
import json
import logging
import os
import sys
import time

import torch
from _common import ROOT, WIDTHS, D, load_core, run_child, timed_peak

log = logging.getLogger("bench")
TEMPLATES = 30
PAIRS = 75  # aligned positions per prompt (77 minus the concept/anchor words)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def features(n_concepts, seed=0):
    """Synthetic per-concept (old, new) token features of real shape, generated one concept at a time."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    for _ in range(n_concepts):
        old = torch.randn(TEMPLATES * PAIRS, D, generator=g, device=DEVICE)
        yield old, old + 0.1 * torch.randn(TEMPLATES * PAIRS, D, generator=g, device=DEVICE)


def weights(seed=1):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return [torch.randn(w, D, generator=g, device=DEVICE) / D**0.5 for w in WIDTHS for _ in range(2)]


def ours(cf, n, ws, prior):
    m = cf.Moments(D, device=DEVICE)
    for old, new in features(n):
        m.add(old, new)
    t = cf.refine_transform(m, prior, 1.0, 0.01)
    return [cf.apply_transform(w, t) for w in ws]


def reference(n, ws, prior, layers=None):
    """Per-matrix formulation: all contexts stacked, statistics and solve redone for every matrix."""
    olds, news = zip(*features(n))
    x_old, x_new = torch.cat(olds).double(), torch.cat(news).double()
    out = []
    for w in ws[:layers]:
        w = w.double()
        targets = x_new @ w.T
        gram = x_old.T @ x_old
        eye = torch.eye(D, dtype=torch.float64, device=DEVICE)
        reg = 0.01 * float(torch.trace(gram)) / D * eye + x_old.shape[0] * prior
        rhs = targets.T @ x_old + w @ reg
        out.append(torch.linalg.solve(gram + reg, rhs.T).T - w)
    return out


def measure(kind: str, n: int, ref_layers: int | None) -> tuple[float, int]:
    """Seconds and peak extra resident memory of one solve, in a fresh process so each peak is its own
    (fork would share torch's thread pool state; a new interpreter is clean)."""
    extra = ["--ref-layers", ref_layers] if ref_layers else []
    result = run_child([__file__, "--measure", kind, "--counts", n, *extra])
    return result["seconds"], result["peak_bytes"]


def _measure_here(kind: str, n: int, ref_layers: int | None):
    cf = load_core().closed_form
    ws = weights()
    prior = prior_moment()
    run = (lambda: ours(cf, n, ws, prior)) if kind == "ours" else (lambda: reference(n, ws, prior, ref_layers))
    _, dt, peak = timed_peak(run, DEVICE)  # on a GPU, GPU memory is what the run spends
    if kind == "reference" and ref_layers:
        dt *= len(ws) / ref_layers
    print(json.dumps({"seconds": dt, "peak_bytes": max(0, peak)}))  # read by the parent process


def prior_moment():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(4000, D, generator=g, dtype=torch.float64)
    return (p.T @ p / p.shape[0]).to(DEVICE)


def encode_rate(n_prompts=16):
    """Seconds per prompt for CLIP-L (random weights, real architecture) through ComfyUI, or None without a host."""
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import comfy_host

    if not comfy_host.available():
        return None, "no host"
    if torch.cuda.is_available():
        os.environ.setdefault("MACE_TEST_GPU", "1")
    comfy_host.boot()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.sd1_clip

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    dtype = torch.float16 if mm.get_torch_device().type == "cuda" else torch.float32
    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
        tok = clip.tokenize("a painting in the style of Claude Monet", disable_weights=True)
        batch = {k: [v[0]] * n_prompts for k, v in tok.items()}
        clip.encode_from_tokens(batch)
        t0 = time.perf_counter()
        clip.encode_from_tokens(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n_prompts, str(mm.get_torch_device())



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,10,100")
    ap.add_argument("--ref-layers", type=int, default=None,
                    help="time the reference on this many matrices and scale to 32 (CPU runs)")
    ap.add_argument("--measure", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return _measure_here(args.measure, int(args.counts), args.ref_layers)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rate, device = encode_rate()
    rows = []
    for n in [int(c) for c in args.counts.split(",")]:
        t_ours, m_ours = measure("ours", n, None)
        t_ref, m_ref = measure("reference", n, args.ref_layers)
        prompts = n * TEMPLATES + TEMPLATES  # concept prompts plus one anchor set
        t_enc = rate * prompts if rate else float("nan")
        rows.append((n, t_enc, t_ours, t_ref, m_ours, m_ref))
    log.info("encoding: %s s/prompt on %s (CLIP-L architecture, ComfyUI)", f"{rate:.4f}" if rate else "-", device)
    log.info("solves on %s", DEVICE)
    log.info("%8s %10s %10s %12s %9s %10s %12s %12s", "concepts", "encode s", "solve s", "reference s",
             "speedup", "solve/enc", "solve MiB", "ref MiB")
    for n, t_enc, t_o, t_r, m_o, m_r in rows:
        log.info("%8d %10.2f %10.3f %12.3f %8.1fx %9.2f%% %12.1f %12.1f", n, t_enc, t_o, t_r, t_r / t_o,
                 100 * t_o / t_enc, m_o / 2**20, m_r / 2**20)
    if args.ref_layers:
        log.info("(reference timed on %d of %d matrices and scaled)", args.ref_layers, 2 * len(WIDTHS))


if __name__ == "__main__":
    main()
