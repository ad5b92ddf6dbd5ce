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


# Sampling types a UNet checkpoint can carry, and the state-dict markers ComfyUI's model detection reads them from
# (comfy.supported_models *.model_type). SD1.x is always eps; SD2.x knows eps and v; SDXL all of them.
SAMPLING_MARKERS = {
    "eps": {},
    "v": {"v_pred": 1.0},
    "v_zsnr": {"v_pred": 1.0, "ztsnr": 1.0},
    "edm": {"edm_mean": 1.0, "edm_std": 1.0},  # Playground v2.5
    "v_edm": {"edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002},
}
FAMILIES = ("sd15", "sd2", "sdxl")


def _markers(family, sampling):
    import torch

    if family == "sd15":
        if sampling != "eps":
            raise ValueError("SD1.x checkpoints are eps-prediction only")
        return {}
    if family == "sd2":
        if sampling not in ("eps", "v"):
            raise ValueError("SD2.x checkpoints are eps or v-prediction")
        # SD20.model_type reads v-prediction from the spread of this bias: > 0.09 is v
        std = 1.0 if sampling == "v" else 0.0
        return {"output_blocks.11.1.transformer_blocks.0.norm1.bias": torch.randn(8, generator=torch.Generator()
                                                                                  .manual_seed(0)) * std}
    return {k: torch.tensor(v) for k, v in SAMPLING_MARKERS[sampling].items()}


def tiny_model(dtype=None, seed=0, family="sd15", sampling="eps", clip_widths=(64, 64), **cfg):
    """A real UNet ModelPatcher of the family (comfy.supported_models SD15 / SD20 / SDXL) at toy widths.

    sdxl: context = clip_l width + clip_g width, 'y' from clip_g's pooled vector plus six 256-wide size embeddings
    (model.encode_adm), linear projections in the transformers. sd2: context = the OpenCLIP-H encoder's width.
    `sampling` picks the prediction type through the same state-dict markers a checkpoint carries.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    dtype = dtype or torch.float32
    if family == "sdxl":
        wl, wg = clip_widths
        cfg.setdefault("context_dim", wl + wg)
        unet = tiny_unet_config(**cfg)
        unet.update(use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=wg + 6 * 256)
        conf = comfy.supported_models.SDXL(unet)
    elif family == "sd2":
        cfg.setdefault("context_dim", clip_widths[0])
        unet = tiny_unet_config(**cfg)
        unet["use_linear_in_transformer"] = True
        conf = comfy.supported_models.SD20(unet)
    elif family == "sd15":
        conf = comfy.supported_models.SD15(tiny_unet_config(**cfg))
    else:
        raise ValueError(f"unknown family {family}")
    if family != "sd15":
        # the family's extra config sets 64-channel heads, which do not divide the toy widths
        conf.unet_config["num_head_channels"] = 16
    # 8-bit weights have no arithmetic of their own: ComfyUI computes such checkpoints in a manual-cast dtype
    conf.set_inference_dtype(dtype, torch.float32 if dtype.itemsize < 2 else None)
    model = conf.get_model(_markers(family, sampling))
    _init_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _text_config(width, layers):
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 2,
            "num_hidden_layers": layers, "projection_dim": width}


def tiny_clip(dtype=None, seed=0, width=64, family="sd15", widths=(64, 64)):
    """A real comfy.sd.CLIP of the family with the bundled tokenizers: SD1.x CLIP-L (2 layers); SD2.x the
    OpenCLIP-H-architecture encoder (penultimate layer, so 3 layers); SDXL clip_l + clip_g (penultimate each)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip
    import torch
    from comfy.supported_models_base import ClipTarget

    dtype = dtype or torch.float32
    if family == "sd15":
        target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        options = {"clip_l_model_config": _text_config(width, 2)}
    elif family == "sd2":
        target = ClipTarget(comfy.text_encoders.sd2_clip.SD2Tokenizer, comfy.text_encoders.sd2_clip.SD2ClipModel)
        options = {"clip_h_model_config": _text_config(widths[0], 3)}
    elif family == "sdxl":
        target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        options = {"clip_l_model_config": _text_config(widths[0], 3),
                   "clip_g_model_config": _text_config(widths[1], 3)}
    else:
        raise ValueError(f"unknown family {family}")
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, **options})
    _init_(clip.cond_stage_model, seed + 1, std=0.02)
    return clip


def tiny_pair(family="sd15", sampling="eps", dtype=None, seed=0):
    """MODEL and CLIP of one family that fit each other (the context widths agree)."""
    if family == "sd15":
        return tiny_model(dtype, seed), tiny_clip(dtype, seed)
    return (tiny_model(dtype, seed, family=family, sampling=sampling),
            tiny_clip(dtype, seed, family=family))


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


def tiny_flux(seed=0):
    """A real Flux ModelPatcher (comfy.supported_models.Flux) at toy width: a family whose text enters through joint
    attention, with no UNet cross-attention for MACE to edit."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cfg = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 64,
           "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
           "guidance_embed": False}
    conf = comfy.supported_models.Flux(cfg)
    conf.set_inference_dtype(torch.float32, None)
    model = conf.get_model({})
    _init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def interrupt_at_check(monkeypatch, n: int) -> list:
    """Press ComfyUI's cancel at the n-th cancel check a node makes (the real check then raises, as in the UI).
    Returns the list of checks made so far; the caller clears the interrupt flag when done."""
    import comfy.model_management as mm

    real = mm.throw_exception_if_processing_interrupted
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            mm.interrupt_current_processing(True)
        real()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", check)
    return calls
