"""MACE stage 2 with many concepts at once (issue 18): per-concept training time at several batch sizes.

K concepts train in one forward and backward pass (nodes/attention.BatchTask through mace_core.train.train_batch, the
code the Train node runs), each with its own LoRA, data, timesteps and optimiser state. For each batch size K it
trains K concepts for --steps steps after a short warm-up, and reports the time per concept-step, the seconds one
concept's 50-step training costs at that batch size, and the ratio to batch 1 measured in the same run (compare
ratios, not seconds). It also prints the batch the node would choose by itself (batch 0) from the free memory. A batch
that does not fit is reported as such, not crashed on.

    python bench/bench_train_batch.py                         # tiny real SD1.x UNet, CPU, 8x8 latents, 1 thread
    python bench/bench_train_batch.py --model sd15 --size 64  # SD1.5-sized random UNet at 512 px (use a GPU)
    python bench/bench_train_batch.py --model sdxl --size 128 --fp16 --batches 1,4,16  # SDXL-sized at 1024 px
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
import comfy_host  # noqa: E402
from bench_train import SD15_UNET, start_pack, sync  # noqa: E402

log = logging.getLogger("bench")

# comfy.supported_models.SDXL's UNet (as comfy.model_detection reads it from the SDXL base checkpoint)
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def build(kind: str, dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    if kind == "tiny":
        return comfy_host.tiny_model(dtype=dtype), comfy_host.tiny_clip()
    conf = comfy.supported_models.SD15(dict(SD15_UNET)) if kind == "sd15" else \
        comfy.supported_models.SDXL(dict(SDXL_UNET))
    conf.set_inference_dtype(dtype, None)
    model = conf.get_model({})
    comfy_host._init_(model.diffusion_model, 0)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    clip = comfy_host.tiny_clip(width=768) if kind == "sd15" else \
        comfy_host.tiny_clip(family="sdxl", widths=(768, 1280))
    return patcher, clip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny")
    ap.add_argument("--size", type=int, default=8, help="latent side (pixels / 8)")
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes (concepts per step), 1 first")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions per batch size (median)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (shared cores: 1 avoids OpenMP spinning)")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--data-batches", default="1,16",
                    help="batch sizes for the training images and masks (blank: skip that table)")
    ap.add_argument("--images", type=int, default=8, help="images per concept for the data table")
    args = ap.parse_args()
    mods = start_pack(args.threads)
    if mods is None:
        return
    import comfy.model_management as mm

    att, host, tr = mods["nodes.attention"], mods["nodes.host"], mods["nodes.train"]
    core = mods["mace_core.train"]
    concepts = mods["mace_core.concepts"]
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.float16 if args.fp16 else torch.float32
    with torch.inference_mode():  # as the executor builds a checkpoint's weights
        model, clip = build(args.model, dtype)
    dev = mm.get_torch_device()
    keys = host.cross_attention_keys(model, clip)
    end_id = host.clip_encoder(clip).end_id
    shapes = {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}
    n = max(batches)
    names = [f"Person Number {i}" for i in range(n)]
    items = concepts.parse_concepts("\n".join(names), "celebrity")
    g = torch.Generator().manual_seed(0)
    s = args.size
    data = []
    with torch.inference_mode():
        for c in items:
            prompts = att.concept_prompts(clip, c, concepts.TEMPLATES[c.concept_type], end_id)
            data.append(att.ConceptData(prompts, torch.randn(2, 4, s, s, generator=g), torch.ones(2, s, s),
                                        "importance"))
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())

    def run(k: int, steps: int) -> float:
        starts = []
        for i in range(k):
            gen = core.concept_generator(0, i)
            up, down = core.init_lora(shapes, 1, gen, device=tm.device)
            starts.append((gen, up, down))
        up = {key: torch.stack([st[1][key].detach() for st in starts]).requires_grad_(True) for key in shapes}
        down = {key: torch.stack([st[2][key].detach() for st in starts]).requires_grad_(True) for key in shapes}
        task = att.BatchTask(tm, data[:k], up, down)
        cfg = core.TrainConfig(steps=steps, learning_rate=1e-4)
        sync(dev)
        t0 = time.perf_counter()
        core.train_batch(task, cfg, [st[0] for st in starts])
        sync(dev)
        return time.perf_counter() - t0

    results, auto = {}, None
    with torch.inference_mode(False), torch.enable_grad():
        tm = att.TrainableModel(model, keys)
        try:
            tm.load()
            up1, down1 = core.init_lora(shapes, 1, torch.Generator().manual_seed(0), device=tm.device)
            auto = tr._training_batch(tm, tr._ConceptData(data[0].prompts, data[0].latents, data[0].masks, "x"),
                                      up1, down1, 0, tr.AUTO_BATCH_MAX)
            for k in batches:
                try:
                    run(k, args.warmup)
                    times = [run(k, args.steps) for _ in range(args.rounds)]
                    results[k] = statistics.median(times) / (args.steps * k)
                except torch.OutOfMemoryError:
                    results[k] = None
                    mm.soft_empty_cache()
        finally:
            with torch.inference_mode():
                tm.release()

    data_rows = {}
    if args.data_batches.strip():
        # the data phase as the node runs it: one sampler run for the batch's images (Train's default image
        # settings), then one batch of attention forwards for their masks; per concept = the batch's time / its concepts
        with torch.inference_mode():
            for k in [int(b) for b in args.data_batches.split(",")]:
                texts = [att.data_template(c).format(c.name) for c in items[:k]]
                prompts = [att.concept_prompts(clip, c, [att.data_template(c)], end_id)[0] for c in items[:k]]
                att.generate_latents_batch(model, clip, texts[:1], 1, 8 * s, [0])  # warm-up
                sync(dev)
                t0 = time.perf_counter()
                lats = att.generate_latents_batch(model, clip, texts, args.images, 8 * s, list(range(k)))
                sync(dev)
                t1 = time.perf_counter()
                att.derive_masks_batch(model, prompts, lats, list(range(k)))
                sync(dev)
                data_rows[k] = ((t1 - t0) / k, (time.perf_counter() - t1) / k)

    if torch.device(dev).type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {args.threads} thread(s)"
    print(f"\nMACE stage 2, many concepts at once: {args.model} UNet ({n_params / 1e6:.1f} M params, "
          f"{len(keys) // 2} cross-attention layers), latent {s}x{s}, rank 1, {str(dtype).replace('torch.', '')}, "
          f"{where}; {args.steps} steps x {args.rounds} rounds per batch size")
    base = results.get(1)
    print(f"{'batch':>6}{'ms/concept-step':>17}{'s/concept (50 steps)':>22}{'x batch 1':>11}")
    for k in batches:
        t = results[k]
        if t is None:
            print(f"{k:>6}{'does not fit in memory':>50}")
            continue
        ratio = f"{t / base:.3f}" if base else "-"
        print(f"{k:>6}{1e3 * t:>17.2f}{50 * t:>22.3f}{ratio:>11}")
    if data_rows:
        print(f"\ntraining data per concept ({args.images} images x {att.GEN_STEPS} sampler steps with CFG, then "
              "attention masks)")
        print(f"{'batch':>6}{'images s':>10}{'masks s':>9}{'x batch 1':>11}")
        first = data_rows.get(1)
        for k, (ti, tm_) in data_rows.items():
            ratio = f"{(ti + tm_) / sum(first):.3f}" if first else "-"
            print(f"{k:>6}{ti:>10.3f}{tm_:>9.3f}{ratio:>11}")
    print(f"batch 0 (automatic) would train {auto} concepts at a time here (free memory "
          f"{mm.get_free_memory(dev) / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
