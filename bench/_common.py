"""What the benches share: SD1.5's cross-attention layout, mace_core loaded by path (host-free), synthetic weights,
text features and LoRAs of real shape, and measurement in a fresh process (so each peak memory is its own)."""

import argparse
import importlib.util
import json
import logging
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# SD1.5: 16 cross-attention layers with inner widths 320/640/1280, each with to_k and to_v, context 768.
WIDTHS = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
D, CTX, START, END = 768, 77, 49406, 49407


def load_core():
    """mace_core under its own name, by path: the pack root never goes on sys.path (its nodes/ would shadow
    ComfyUI's nodes module)."""
    if "mace_core" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mace_core", ROOT / "mace_core" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "mace_core")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["mace_core"] = mod
        spec.loader.exec_module(mod)
    import mace_core.closed_form
    import mace_core.concepts
    import mace_core.fuse
    import mace_core.lora_bundle
    import mace_core.refine

    return mace_core


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class SyntheticEncoder:
    """mace_core.text.TextEncoder of CLIP-L's shape: one id per word (so concept/anchor alignment works as with real
    tokens), features seeded by the prompt (a shared part, as real prompts share start and padding tokens, plus a
    prompt-specific part). Records the time it spends, which a stage's time can then leave out."""

    end_id, context_length, dim = END, CTX, D

    def __init__(self, device):
        self.device = device
        self.shared = torch.randn(CTX, D, generator=torch.Generator().manual_seed(7)).to(device)
        self.seconds = 0.0
        self.prompts = 0

    def token_count(self, text):
        return len(text.split())

    def _ids(self, prompt):
        words = [zlib.crc32(w.encode()) % 49000 + 1 for w in prompt.split()][:CTX - 2]
        return [START] + words + [END] * (CTX - 1 - len(words))

    def encode(self, prompts):
        sync(self.device)
        t0 = time.perf_counter()
        feats = torch.empty(len(prompts), CTX, D, device=self.device)
        for i, p in enumerate(prompts):
            g = torch.Generator(self.device).manual_seed(zlib.crc32(p.encode()))
            feats[i] = self.shared + torch.randn(CTX, D, generator=g, device=self.device)
        ids = [self._ids(p) for p in prompts]
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.prompts += len(prompts)
        return ids, feats


def sd15_keys():
    return [f"diffusion_model.layer{i}.attn2.to_{kv}.weight" for i in range(len(WIDTHS)) for kv in "kv"]


def sd15_weights(device):
    """(W0, W'): random to_k/to_v weights of SD1.5's shapes and a slightly moved copy (as after refinement)."""
    g = torch.Generator().manual_seed(1)
    w0, wp = {}, {}
    for k, w in zip(sd15_keys(), [w for w in WIDTHS for _ in range(2)]):
        w0[k] = (torch.randn(w, D, generator=g) / D**0.5).to(device)
        wp[k] = w0[k] + 0.01 * torch.randn(w, D, generator=g).to(device) / D**0.5
    return w0, wp


def prior(device):
    """A d x d second moment of generic text features (float64)."""
    p = torch.randn(4000, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return (p.T @ p / p.shape[0]).to(device)


def make_loras(core, items, w0, device="cpu"):
    """Random rank-1 LoRAs for concepts (objects with name, anchor, concept_type), as a MACE_LORAS bundle holds them."""
    g = torch.Generator().manual_seed(3)
    out = []
    for c in items:
        up = {k: (torch.randn(w.shape[0], 1, generator=g) * 0.05).to(device) for k, w in w0.items()}
        down = {k: (torch.randn(1, D, generator=g) / D**0.5).to(device) for k in w0}
        out.append(core.lora_bundle.ConceptLoRA(c.name, c.anchor, c.concept_type, 1, 50, up, down))
    return out


def run_child(args, threads=None) -> dict:
    """Run `python <args>` in a fresh interpreter and return the JSON object its last line prints. glibc returns
    large blocks to the system at once there, so the child's peak RSS belongs to its own measurement (a forked or
    reused process recycles freed pages and hides it)."""
    cmd = [sys.executable, *map(str, args)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def timed_peak(fn, device):
    """(fn(), seconds, peak extra bytes while it ran): the CUDA allocator's peak on a GPU; on a CPU the process's peak
    RSS over the RSS at the start, with the peak counter restarted where Linux allows (else the lifetime peak, which
    making the inputs may already have set: measure in a fresh process, see run_child)."""
    device = torch.device(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
        hwm = reset_peak_rss()
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        return result, seconds, torch.cuda.max_memory_allocated() - base
    top = peak_rss() if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result, seconds, max(0, top - base)


def reset_peak_rss() -> bool:
    """Linux: restart the process's peak-RSS counter (VmHWM) here, so the peak is the measured stage's alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss() is not None
    except OSError:
        return False


def peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def add_device_args(ap: argparse.ArgumentParser):
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")


def start(args) -> torch.device:
    """Logging as the benches print it (the pack's own INFO lines silenced), threads, and the device to measure on."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("MACE").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
