"""Boot a real ComfyUI in-process for the host tests and build tiny, real models from its own classes.

Nothing here imitates ComfyUI: every object is ComfyUI's own, only small. The host source is found through
COMFYUI_PATH (default ~/comfy/ComfyUI); `available()` says whether it is there.
"""

import importlib.machinery
import os
import sys
import types
from pathlib import Path

HOST = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI")).expanduser()
PACK = Path(__file__).resolve().parents[2]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def available() -> bool:
    return (HOST / "comfy" / "model_patcher.py").is_file()


def _stub_torchvision():
    # ComfyUI core imports torchvision for families we do not test; the registry's wheel does not import beside
    # the CPU torch. transformers calls find_spec on it, hence the __spec__.
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    for name in ("torchvision", "torchvision.transforms"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


_booted = False


def boot():
    """Import ComfyUI (CPU mode) once per process."""
    global _booted
    if _booted:
        return
    if str(HOST) not in sys.path:
        sys.path.insert(0, str(HOST))
    _stub_torchvision()
    from comfy.cli_args import args

    # CPU unless asked otherwise: tests must pass on machines without a GPU; MACE_TEST_GPU=1 runs them on one.
    args.cpu = os.environ.get("MACE_TEST_GPU") != "1"
    import comfy.model_management  # noqa: F401  (reads args.cpu now)

    _booted = True


def unload_all():
    """Unload every model, so the shared modules hold their original weights again (a loaded patched clone patches
    them in place until unloaded). Under inference mode, as the executor does: on a GPU the weights move back to the
    CPU, and moving inference tensors outside inference mode leaves them unusable."""
    import comfy.model_management as mm
    import torch

    with torch.inference_mode():
        mm.unload_all_models()


def tiny_unet_config(model_channels=32, context_dim=64, channel_mult=(1, 2), transformer_depth_middle=1,
                     transformer_depth=1):
    """The keys comfy.model_detection.detect_unet_config yields for an SD1.x UNet, at toy size."""
    levels = len(channel_mult)
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [1] * levels,
        "transformer_depth": [transformer_depth] * levels,
        "transformer_depth_output": [transformer_depth] * (2 * levels),
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": transformer_depth_middle if transformer_depth else -1,
        "use_linear_in_transformer": False,
        "context_dim": context_dim,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
        "num_head_channels": 16,
    }


def _init_(module, seed, std=None):
    # ComfyUI's ops skip reset_parameters; give every weight a deterministic value: 1/sqrt(fan_in) for the UNet,
    # a fixed small std for the text encoder as CLIP's own initialisation does.
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim >= 2:
                scale = std if std is not None else 1 / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def tiny_model(dtype=None, seed=0, **cfg):
    """A real SD1.5 ModelPatcher (comfy.supported_models.SD15) with toy widths."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    dtype = dtype or torch.float32
    conf = comfy.supported_models.SD15(tiny_unet_config(**cfg))
    conf.set_inference_dtype(dtype, None)
    model = conf.get_model({})
    _init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_clip(dtype=None, seed=0, width=64):
    """A real comfy.sd.CLIP for SD1.x with the bundled tokenizer and a 2-layer text model."""
    import comfy.sd
    import comfy.sd1_clip
    import torch

    dtype = dtype or torch.float32
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    cfg = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
           "num_hidden_layers": 2, "projection_dim": width}
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, "clip_l_model_config": cfg})
    _init_(clip.cond_stage_model, seed + 1, std=0.02)
    return clip


def tiny_vae(seed=0):
    """A real comfy.sd.VAE with TAESD architecture (randomly initialised)."""
    import comfy.sd
    import comfy.taesd.taesd
    import torch

    torch.manual_seed(seed)
    sd = comfy.taesd.taesd.TAESD(latent_channels=4).state_dict()
    return comfy.sd.VAE(sd=sd)


def write_sd15_checkpoint(path, seed=0):
    """A checkpoint CheckpointLoaderSimple detects as SD1.5: model_channels 320 and context_dim 768 (what detection
    keys on) but one level, one res block and no middle block, the full CLIP-L, a TAESD VAE; fp16, ~275 MiB."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import torch

    cfg = tiny_unet_config(model_channels=320, context_dim=768, channel_mult=(1,), transformer_depth_middle=-2)
    cfg.pop("num_head_channels")
    conf = comfy.supported_models.SD15(cfg)
    conf.set_inference_dtype(torch.float16, None)
    model = conf.get_model({})
    _init_(model.diffusion_model, seed)
    model.diffusion_model.half()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float16})
    _init_(clip.cond_stage_model, seed + 1, std=0.02)
    tmp = str(path) + ".tmp"
    comfy.sd.save_checkpoint(tmp, patcher, clip, tiny_vae(seed))
    import os

    os.replace(tmp, path)
    return path
