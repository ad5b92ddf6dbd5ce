"""mace-erase: the whole MACE pipeline, headless, through a real ComfyUI.

    python scripts/mace_erase.py --concepts "Claude Monet" --concept-type style --checkpoint sd15.safetensors
    python scripts/mace_erase.py            # the pack's concept world: erases one of its concepts

Starts ComfyUI (COMFYUI_PATH, default ~/comfy/ComfyUI) on 127.0.0.1 with this pack, runs the mace_erase graph
(Refine -> Train -> Fuse -> before/after samples -> Save Erasure), shows progress, copies the images and the erasure
LoRA into --out, and stops the server.
"""

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comfy_server import ComfyServer, default_host, error_text  # noqa: E402
from pipelines import WORLD_DEFAULT, erase_graph  # noqa: E402

log = logging.getLogger("mace-erase")


def link_pack(base: Path):
    """ComfyUI loads custom nodes from its custom_nodes folder: make sure this checkout is the one linked there."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-mace"
    if link.is_symlink() and link.resolve() != HERE.parent:
        link.unlink()  # a link to another (or a removed) checkout: point it here
    if not link.exists():
        link.symlink_to(HERE.parent)
    elif link.resolve() != HERE.parent:
        raise SystemExit(f"{link} is another copy of the pack; remove it or run mace-erase from that copy.")


def place_checkpoint(base: Path, path: str) -> str:
    """CheckpointLoaderSimple reads names under models/checkpoints: link a file from elsewhere in."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise SystemExit(f"--checkpoint: no such file {src}")
    if src.suffix != ".safetensors":
        raise SystemExit("--checkpoint: only .safetensors checkpoints are read (no pickle files).")
    ckpts = (base / "models" / "checkpoints").resolve()
    if ckpts in src.parents:
        return str(src.relative_to(ckpts))
    dest = ckpts / "mace-cli" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    dest.symlink_to(src)
    return f"mace-cli/{src.name}"


def checkpoint_size(path: str) -> int:
    """The side a checkpoint's family samples at, from its tensor shapes (the CLI does not import ComfyUI): the
    cross-attention's context width tells SDXL (2048; its refiner 1280) from SD2.x (1024) from SD1.x (768), and SD2.x's
    768-v models from its 512 eps base by the spread ComfyUI's own detection reads."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        ctx = next((f.get_slice(k).get_shape()[1] for k in keys if k.endswith("attn2.to_k.weight")), 768)
        if ctx >= 1280:
            return 1024
        if ctx == 1024:
            bias = next((k for k in keys if k.endswith("output_blocks.11.1.transformer_blocks.0.norm1.bias")), None)
            if bias is not None and float(f.get_tensor(bias).float().std(unbiased=False)) > 0.09:
                return 768
    return 512


def main(argv=None):
    ap = argparse.ArgumentParser(prog="mace-erase", description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", default=None,
                    help="concepts to erase, separated by ';' or newlines (default: a concept of the concept world)")
    ap.add_argument("--concept-type", default=None, choices=["object", "celebrity", "style", "explicit"])
    ap.add_argument("--preserve", default="", help="concepts to preserve, separated by ';'")
    ap.add_argument("--checkpoint", default=None, help="an SD1.x/SD2.x/SDXL .safetensors checkpoint "
                                                       "(default: the pack's concept world, trained on first use)")
    ap.add_argument("--prompt", default=None, help="prompt to sample before and after (default: the first concept)")
    ap.add_argument("--steps", type=int, default=None, help="LoRA training steps per concept")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="LoRA learning rate (default 1e-4 for a checkpoint, the concept world's own for the world)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="mace_out", help="folder for the before/after images and the erasure LoRA")
    ap.add_argument("--name", default="mace_erasure", help="file name prefix of the erasure LoRA")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's usual size)")
    ap.add_argument("--sample-steps", type=int, default=None, help="sampler steps of the before/after images")
    ap.add_argument("--images", type=int, default=8, help="training images per concept")
    ap.add_argument("--base-directory", default=None,
                    help="ComfyUI base directory for models, custom_nodes, input and output (default: the host's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[mace-erase] %(message)s")

    host = default_host()
    base = Path(args.base_directory).resolve() if args.base_directory else host
    link_pack(base)
    world = args.checkpoint is None
    ckpt = None if world else place_checkpoint(base, args.checkpoint)
    defaults = WORLD_DEFAULT if world else {"concept_type": "celebrity", "steps": 50, "sample_steps": 20,
                                            "size": checkpoint_size(str(Path(args.checkpoint).expanduser()))}
    concepts = "\n".join(c.strip() for c in (args.concepts or defaults.get("concepts", "")).replace(";", "\n")
                         .splitlines() if c.strip())
    if not concepts:
        raise SystemExit("--concepts: give at least one concept to erase.")
    graph = erase_graph(
        ckpt=ckpt,
        concepts=concepts,
        concept_type=args.concept_type or defaults["concept_type"],
        preserve="\n".join(p.strip() for p in args.preserve.split(";") if p.strip()) or defaults.get("preserve", ""),
        prompt=args.prompt,
        seed=args.seed,
        size=args.size or defaults["size"],
        steps=args.sample_steps or defaults["sample_steps"],
        images=args.images,
        # training images at the model's own size: the world draws at 64 px (0 lets Train pick the family's size)
        image_size=args.size or (defaults["size"] if world else 0),
        train_steps=args.steps or defaults["steps"],
        prefix=args.name,
        learning_rate=args.learning_rate or defaults.get("learning_rate", 1e-4),
        cfg=defaults.get("cfg", 7.0),
        # the world's training images at its guidance too (at 7 it oversaturates); a checkpoint's at Train's default
        image_cfg=defaults.get("cfg"),
    ).api()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("starting ComfyUI at %s (its log: %s)", host, out / "comfyui.log")
    extra = ["--base-directory", str(base)] if args.base_directory else []
    with ComfyServer(host, extra_args=extra, log_file=out.resolve() / "comfyui.log") as server:
        log.info("server on %s; erasing: %s", server.url, ", ".join(concepts.splitlines()))
        entry = server.run(graph)
    err = error_text(entry)
    if err:
        raise SystemExit(f"the erasure failed: {err}")
    copied = []
    for node_out in entry["outputs"].values():
        for item in node_out.get("images", []):
            src = base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
            if src.is_file():
                shutil.copy2(src, out / src.name)
                copied.append(src.name)
    for lora in sorted((base / "models" / "loras").glob(f"{args.name}*.safetensors"),
                       key=os.path.getmtime)[-1:]:
        shutil.copy2(lora, out / lora.name)
        copied.append(lora.name)
    log.info("done: %s in %s", ", ".join(copied), out.resolve())


if __name__ == "__main__":
    main()
