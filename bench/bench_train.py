"""MACE stage 2 (Train Concept LoRA): what the attention capture and the LoRA wrappers cost over a plain UNet step.

On one model, one batch (one latent, one prompt, one timestep) and in one process, it times:
  plain     forward + backward of the same UNet (loss on its output, gradient to the input, no patches)
  wrapped   the same with the training clone's weight wrappers (trainable LoRA on every attn2 to_k/to_v, detached
            copies of every other weight), still a loss on the output
  train     a full MACE training step: probed cross-attention, masked attention loss, backward, clipping, AdamW
and reports per-step medians, their ratios to plain, memory (CUDA peak when on a GPU; everywhere, the bytes autograd
saves for backward), then seconds per concept for a whole 50-step training through the node's own function.
Compare ratios, not seconds: the figures of one run come from the same process on the same machine.

    python bench/bench_train.py                 # tiny real SD1.x UNet, CPU, 16x16 latents, 1 thread
    python bench/bench_train.py --sd15 --size 64  # SD1.5-sized random UNet at 512 px (use a GPU)
"""

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))
import comfy_host  # noqa: E402

log = logging.getLogger("bench")

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def load_pack():
    comfy_host.boot()
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(comfy_host.PACK))):
        raise SystemExit("the pack failed to load")
    name = str(comfy_host.PACK).replace(".", "_x_")
    return {m: sys.modules[f"{name}.{m}"] for m in ("nodes.train", "nodes.attention", "nodes.host",
                                                     "mace_core.concepts", "mace_core.train")}


def start_pack(threads: int):
    """What every training bench does first: quiet logging, its thread count, the host booted and the pack loaded
    (its modules), or None without a ComfyUI host."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(threads)
    if not comfy_host.available():
        print(f"no ComfyUI host at {comfy_host.HOST} (set COMFYUI_PATH); nothing to measure")
        return None
    return load_pack()


def build(sd15: bool, dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if not sd15:
        return comfy_host.tiny_model(dtype=dtype), comfy_host.tiny_clip()
    conf = comfy.supported_models.SD15(dict(SD15_UNET))
    conf.set_inference_dtype(dtype, None)
    model = conf.get_model({})
    comfy_host._init_(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, comfy_host.tiny_clip(width=768)


class SavedBytes:
    """Bytes autograd keeps for backward (unique storages): the activation memory of a step, on any device."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in self.seen:
                self.seen.add(key)
                self.total += t.untyped_storage().nbytes()
        except Exception:
            pass
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd15", action="store_true", help="SD1.5-sized random UNet instead of the tiny one")
    ap.add_argument("--size", type=int, default=16, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int, default=50, help="steps of the per-concept training run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (shared cores: 1 avoids OpenMP spinning)")
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()
    mods = start_pack(args.threads)
    if mods is None:
        return
    import comfy.model_management as mm

    att, host, tr = mods["nodes.attention"], mods["nodes.host"], mods["nodes.train"]
    core_train = mods["mace_core.train"]
    dtype = torch.float16 if args.fp16 else torch.float32
    model, clip = build(args.sd15, dtype)
    model.model.diffusion_model.requires_grad_(False)  # the bench's own model: no weight gradients anywhere
    dev = mm.get_torch_device()
    keys = host.cross_attention_keys(model, clip)
    concept = mods["mace_core.concepts"].parse_concepts("Claude Monet", "celebrity")[0]
    prompts = att.concept_prompts(clip, concept, ["a photo of {}"], host.clip_encoder(clip).end_id)
    g = torch.Generator().manual_seed(0)
    s = args.size
    lat = torch.randn(1, 4, s, s, generator=g)
    mask = torch.ones(1, s, s)
    noise = torch.randn(1, 4, s, s, generator=g).to(dev)
    t = torch.tensor([300])
    shapes = {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())

    plain = model.clone()
    tm = att.TrainableModel(model, keys)
    up, down = core_train.init_lora(shapes, 1, torch.Generator().manual_seed(0), device=tm.device)
    up = {k: u[None].detach().requires_grad_(True) for k, u in up.items()}  # the Train node's batch of one concept
    down = {k: d[None].detach().requires_grad_(True) for k, d in down.items()}
    task = att.BatchTask(tm, [att.ConceptData(prompts, lat, mask, "importance")], up, down)
    conds = task.conds[0][0]
    x0 = task.x0[0]
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4)

    def step_plain():
        x = x0.detach().clone().requires_grad_(True)
        out = att.denoise_forward(plain, x, noise, t, conds)
        out.float().square().mean().backward()

    def step_wrapped():
        tm.probe.sink = None
        tm.probe.positions = None
        tm.set_lora(up, down)
        out = att.denoise_forward(tm.patcher, x0, noise, t, conds)
        out.float().square().mean().backward()
        opt.zero_grad(set_to_none=True)

    fixed = torch.Generator()

    def step_train():
        opt.zero_grad(set_to_none=True)
        loss = task.losses(0, [fixed.manual_seed(0)]).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()

    phases = {"plain": (plain, step_plain), "wrapped": (tm.patcher, step_wrapped), "train": (tm.patcher, step_train)}
    times = {k: [] for k in phases}
    saved, peak = {}, {}
    with torch.inference_mode(False), torch.enable_grad():
        try:
            for r in range(args.rounds + 1):
                for name, (patcher, fn) in phases.items():
                    mm.load_models_gpu([patcher], force_full_load=True)
                    if r == 0:  # warm-up round: also measures memory
                        if torch.device(dev).type == "cuda":
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        with SavedBytes() as sb:
                            fn()
                        # the train phase's own hooks (frozen weights remade in backward) count what it keeps
                        saved[name] = tm.copies.kept_bytes if name == "train" else sb.total
                        if torch.device(dev).type == "cuda":
                            peak[name] = torch.cuda.max_memory_allocated() - base
                        continue
                    sync(dev)
                    t0 = time.perf_counter()
                    for _ in range(args.per_round):
                        fn()
                    sync(dev)
                    times[name].append((time.perf_counter() - t0) / args.per_round)
        finally:
            tm.release()
            att.release_patcher(plain)

    med = {k: statistics.median(v) for k, v in times.items()}
    dev_name = torch.cuda.get_device_name() if torch.device(dev).type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"\nMACE stage 2 step cost: {'SD1.5-sized' if args.sd15 else 'tiny'} UNet ({n_params / 1e6:.2f} M params, "
          f"{len(keys) // 2} cross-attention layers), latent {s}x{s}, batch 1, {str(dtype).replace('torch.', '')}, "
          f"{dev_name}")
    print(f"{'phase':<10}{'ms/step':>10}{'x plain':>9}{'saved MiB':>11}" +
          (f"{'peak MiB':>10}" if peak else ""))
    for k in phases:
        row = f"{k:<10}{1e3 * med[k]:>10.2f}{med[k] / med['plain']:>9.2f}{saved[k] / 2**20:>11.1f}"
        if peak:
            row += f"{peak[k] / 2**20:>10.1f}"
        print(row)

    # whole-node timing: 50 steps per concept on given latents (no generation), then the data preparation alone
    lat8 = {"samples": torch.randn(8, 4, s, s, generator=g)}
    with torch.inference_mode():
        t0 = time.perf_counter()
        tr.train_concept_loras(model, clip, "Claude Monet", "celebrity", steps=args.steps, latents=lat8,
                               mask_source="whole image")
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        tr.train_concept_loras(model, clip, "Claude Monet", "celebrity", steps=1, images_per_concept=8,
                               image_size=8 * s, mask_source="attention")
        t_data = time.perf_counter() - t0
    print(f"\nseconds per concept, {args.steps} steps on 8 given latents: {t_train:.2f} s "
          f"({1e3 * t_train / args.steps:.1f} ms/step all included)")
    print(f"data preparation per concept (8 images x {att.GEN_STEPS} sampler steps with CFG, attention masks, "
          f"+1 training step): {t_data:.2f} s")


if __name__ == "__main__":
    main()
