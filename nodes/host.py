"""The one place that touches ComfyUI internals for the closed-form stages: cross-attention keys and their original
weights, per-token text encoding, patches on a clone, progress and cancel, the per-encoder cache.

When ComfyUI changes, this file (and attention.py for training) is what needs mending.
"""

import hashlib
import logging
import os
import re
import weakref
from collections.abc import Mapping

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from safetensors.torch import load_file, save_file

from ..mace_core.errors import MaceInputError

log = logging.getLogger("MACE")

_KV = re.compile(r"^diffusion_model\..*\.attn2\.to_[kv]\.weight$")


# ---------------------------------------------------------------- model side

# What each supported family's cross-attention reads; for the error that names a mismatched CLIP.
_FAMILY_TEXT = {"SD15": "SD1.x (CLIP-L)", "SD20": "SD2.x (OpenCLIP-H)", "SDXL": "SDXL (CLIP-L + CLIP-G)"}


def model_family(model) -> str:
    """ComfyUI's name for the model's family (its supported_models config class: SD15, SD20, SDXL, Flux, SD3...)."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def clip_family(clip) -> str:
    """The text encoder's class name as ComfyUI built it (SD1ClipModel, SD2ClipModel, SDXLClipModel, ...)."""
    return type(getattr(clip, "cond_stage_model", clip)).__name__


def cross_attention_keys(model, clip=None) -> list[str]:
    """Every attn2 to_k/to_v weight key of the UNet; a clear error for families without text cross-attention, and
    for a CLIP whose features the cross-attention cannot read (checked before anything is computed)."""
    if not hasattr(model, "model_state_dict") or not hasattr(getattr(model, "model", None), "diffusion_model"):
        raise MaceInputError("model", f"expected a diffusion MODEL, got {type(model).__name__}.")
    sd = model.model_state_dict()
    keys = sorted(k for k in sd if _KV.match(k))
    family = model_family(model)
    if not keys:
        raise MaceInputError("model", f"the {family} model family is not supported yet: it has no UNet "
                                      f"cross-attention (attn2.to_k/to_v) for MACE to edit.",
                             "MACE supports SD1.x, SD2.x and SDXL-family UNets.")
    if clip is not None:
        widths = {sd[k].shape[1] for k in keys}
        dim = text_width(clip)
        if widths != {dim}:
            reads = _FAMILY_TEXT.get(family, family)
            raise MaceInputError("clip", f"this {clip_family(clip)} text encoder gives {dim}-wide features, but the "
                                         f"{reads} model's cross-attention reads {sorted(widths)}-wide ones.",
                                 "Connect the CLIP loaded with this checkpoint (the same Load Checkpoint node).")
    return keys


def original_weights(model, keys: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, whatever patches this clone carries (a loaded clone's state dict is patched)."""
    patches = model.get_key_patches("diffusion_model.")
    return {k: patches[k][0][0].detach() for k in keys}


def current_weights(model, keys: list[str], device=None) -> dict[str, torch.Tensor]:
    """Weights as this MODEL computes with them (original plus its patches), in float32."""
    patches = model.get_key_patches("diffusion_model.")
    out = {}
    for k in keys:
        w = patches[k][0][0].detach().to(device=device, dtype=torch.float32, copy=True)
        if len(patches[k]) > 1:
            w = comfy.lora.calculate_weight(patches[k][1:], w, k)
        out[k] = w
    return out


class CurrentWeights(Mapping):
    """current_weights as a mapping computed one key at a time: a caller that reads the matrices one by one never holds
    all of them in float32 (SDXL's 140 K/V matrices are 1.3 GB so). `shapes` answers without computing anything."""

    def __init__(self, model, keys: list[str], device=None):
        self._model, self._keys, self._device = model, list(keys), device
        patches = model.get_key_patches("diffusion_model.")
        self.shapes = {k: tuple(patches[k][0][0].shape) for k in self._keys}

    def __getitem__(self, key):
        if key not in self.shapes:
            raise KeyError(key)
        return current_weights(self._model, [key], self._device)[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def patch_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a MACE 'diff' patch is kept in for weights stored in `weight_dtype`.

    16- and 32-bit weights take the patch in their own dtype (ComfyUI adds it in float32 and rounds the sum back to
    that dtype anyway). 8-bit weights (fp8 checkpoints) do not: cast to float8_e4m3fn, a 3e-3-scale delta is off by
    18 % (its subnormal range), and of a 3e-4-scale one the loaded model keeps 3 %; in float16 the patch is exact and
    ComfyUI's stochastic rounding of W0 + delta into fp8 keeps it unbiased (the model computes with 100 +- 4 % of it on
    average, each weight still on the fp8 grid). tests/host/test_families.py measures both.
    """
    if weight_dtype.itemsize < 2:
        return torch.float16
    return weight_dtype


# Every delta tensor MACE has handed to a ModelPatcher. Clones share patch tensors (clone() copies the lists, not the
# tensors), so this tells MACE's own change apart from any other patch (a LoRA loaded upstream) on the same keys.
# Keyed by id with an identity check (a WeakSet would compare tensors with ==); entries vanish with their tensors.
_MACE_PATCHES: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _is_mace_patch(t) -> bool:
    return isinstance(t, torch.Tensor) and _MACE_PATCHES.get(id(t)) is t


def training_clone(model):
    """A clone to train through. ComfyUI releases from early 2026 stream weights in per layer by default ("dynamic
    VRAM", on GPUs): the weight a layer computes with may then sit in a buffer reused after the layer has run, which
    backpropagation through the whole UNet cannot rely on, and weight wrappers are skipped on small modules. Those
    releases offer a clone that loads the usual way; the pinned host (0.3.64) has no dynamic mode, so a plain clone.
    Not exercised here: no ComfyUI with the mode reaches this machine (docs/compatibility.md)."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        try:
            return model.clone(disable_dynamic=True)
        except (RuntimeError, TypeError) as e:  # a loader that left no way to rebuild the model statically
            log.warning("MACE: training through a dynamically loaded model (%s); if the LoRAs come out wrong, start "
                        "ComfyUI with --disable-dynamic-vram", e)
    return model.clone()


def with_deltas(model, deltas: Mapping[str, torch.Tensor], strength: float = 1.0):
    """A clone carrying each delta as a 'diff' patch; the incoming model is not touched. All or nothing. The one way a
    MACE stage's result reaches a model: refine's and fuse's WeightDeltas (mace_core.closed_form), and the train
    preview's summed LoRAs as the same kind. The deltas' tensors become the patches' (do not change them
    afterwards)."""
    originals = original_weights(model, list(deltas))
    patched = model.clone()
    spec = {}
    for k, d in deltas.items():
        # the patch takes the caller's tensor over when it already has the right dtype and device (no copy: SDXL's
        # deltas are 0.7 GB in fp16); callers hand over fresh tensors
        t = d.to(device=originals[k].device, dtype=patch_dtype(originals[k].dtype))
        _MACE_PATCHES[id(t)] = t
        spec[k] = ("diff", (t,))
    applied = set(patched.add_patches(spec, strength))
    missing = set(deltas) - applied
    if missing:
        raise MaceInputError("model", f"{len(missing)} cross-attention weights could not be patched "
                                      f"(e.g. {sorted(missing)[0]}).", "Use the MODEL this edit was computed for.")
    return patched


def mace_deltas(model, keys: list[str], device=None) -> dict[str, torch.Tensor]:
    """What MACE nodes added to these weights (float32), leaving out every other patch on them (LoRAs loaded before
    or after MACE). Keys MACE did not change are absent."""
    patches = model.get_key_patches("diffusion_model.")
    out = {}
    for k in keys:
        total = None
        for strength, value, strength_model, offset, function in patches[k][1:]:
            if not (isinstance(value, tuple) and value and value[0] == "diff" and _is_mace_patch(value[1][0])):
                continue
            if strength_model != 1.0 or offset is not None or function is not None:
                raise MaceInputError("model", f"a MACE patch on {k} was re-applied with a model strength, offset or "
                                              "function; its change cannot be separated.")
            d = value[1][0].to(device=device, dtype=torch.float32) * strength
            total = d if total is None else total + d
        if total is not None:
            out[k] = total
    return out


def compute_device():
    return mm.get_torch_device()


def timestep_sigmas(model, timesteps: torch.Tensor) -> torch.Tensor:
    """Noise levels for DDPM-style integer timesteps (0 = clean .. 999 = pure noise), through the model's own
    percent-to-sigma mapping, so every sampling type a ComfyUI UNet has (eps, v, v with zero terminal SNR, EDM,
    v-EDM) gets sigmas inside its own range.

    model_sampling.sigma(t) reads t in the model's own timestep units: for discrete schedules that is the DDPM step
    and gives the same values; for EDM it is 0.25 log(sigma), and step 300 would mean sigma = exp(1200) = inf.
    ComfyUI's percent (0 = start of sampling, 1 = end) is the one scale every sampling type shares.
    """
    ms = model.model.model_sampling
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    steps = 999.0
    out = []
    for t in timesteps.flatten().tolist():
        if not 0 <= t <= steps:
            raise ValueError(f"timestep {t} is outside 0..{steps:.0f}")
        # percent_to_sigma maps the ends to 0 and "infinite"; the ends of the model's range are what they mean
        s = ms.percent_to_sigma(1.0 - t / steps) if 0 < t < steps else (lo if t == 0 else hi)
        out.append(min(max(float(s), lo), hi))
    sigmas = torch.tensor(out, dtype=torch.float32).reshape(timesteps.shape)
    if not bool(torch.isfinite(sigmas).all()):
        raise RuntimeError(f"MACE: the {model_family(model)} model's sampling gives non-finite noise levels "
                           f"{out} for timesteps {timesteps.tolist()}")
    return sigmas


# The model_options entry by which a model says how it is meant to be sampled (the pack's concept world sets it:
# 64 px, where its SD1.5 class would say 512, which is 64x the pixels and off everything it learned).
SAMPLING_HINT = "mace_sampling_hint"


def default_image_size(model) -> int:
    """The side the model was trained at: what its sampling hint says, else SDXL 1024; SD2.x 768 for its
    v-prediction models (768-v) and 512 for the eps base; SD1.x 512. Training images are made at this size unless
    the user gives one."""
    hint = (getattr(model, "model_options", None) or {}).get(SAMPLING_HINT) or {}
    if hint.get("image_size"):
        return int(hint["image_size"])
    family = model_family(model)
    ctx = model.model.model_config.unet_config.get("context_dim") or 768
    if family.startswith("SDXL") or family in ("SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B") or ctx >= 2048:
        return 1024
    if family.startswith("SD2") and model.model.model_type.name.startswith("V_PREDICTION"):
        return 768
    return 512


# SDXL's label embedding: y = [pooled text vector | six 256-wide size embeddings] (comfy.model_base.SDXL.encode_adm)
# enters through this linear layer (openaimodel.UNetModel, num_classes "sequential": label_emb[0][0])
POOLED_KEY = "diffusion_model.label_emb.0.0.weight"
SDXL_SIZE_EMBED = 6 * 256


def pooled_key(model, clip) -> str | None:
    """The weight key whose first `pooled width` input columns read the CLIP's pooled vector, or None where the
    family has no such road (SD1.x/SD2.x, or a label embedding whose layout is not SDXL's [pooled | sizes])."""
    import comfy.model_base

    if not isinstance(model.model, comfy.model_base.SDXL):  # SDXLRefiner has 5 size embeddings and no CLIP-L
        return None
    patches = model.get_key_patches("diffusion_model.")
    if POOLED_KEY not in patches:
        return None
    cols = patches[POOLED_KEY][0][0].shape[1]
    width = pooled_width(clip)
    if width is None or cols != width + SDXL_SIZE_EMBED:
        raise MaceInputError("clip", f"this {clip_family(clip)} text encoder's pooled vector is {width} wide, but the "
                                     f"SDXL model's label embedding reads {cols - SDXL_SIZE_EMBED} pooled values.",
                             "Connect the CLIP loaded with this checkpoint (the same Load Checkpoint node).")
    return POOLED_KEY


def encode_pooled(clip, prompts: list[str]) -> torch.Tensor:
    """(n, width) pooled vectors as CLIPTextEncode gives them (weights syntax off). One prompt per call: ComfyUI
    returns the pooled vector of the first window only when several are encoded together."""
    out = []
    for p in prompts:
        _, pooled = clip.encode_from_tokens(clip.tokenize(p, disable_weights=True), return_pooled=True)
        out.append(pooled.reshape(1, -1).float())
    return torch.cat(out)


def pooled_width(clip) -> int | None:
    _, pooled = clip.encode_from_tokens(clip.tokenize("a", disable_weights=True), return_pooled=True)
    return None if pooled is None else int(pooled.shape[-1])


def model_fingerprint(model) -> str:
    """Identifies the base weights of the cross-attention layers (to label files and check they fit)."""
    keys = cross_attention_keys(model)
    return _fingerprint(original_weights(model, keys))


# ---------------------------------------------------------------- text side

def text_width(clip) -> int:
    return int(clip_encoder(clip).dim)


class ClipEncoder:
    """mace_core.text.TextEncoder over ComfyUI's CLIP: the exact per-token context the UNet sees.

    Prompts are tokenized without ComfyUI's weight syntax and encoded many at a time as independent 77-token
    windows of one call (each window is encoded on its own, so batching does not change the result).
    """

    def __init__(self, clip, batch: int = 32):
        self._clip = weakref.ref(clip)  # the per-CLIP cache below must not keep ComfyUI's CLIP alive
        self.batch = batch
        # mace_core's results for this CLIP (TextEncoder.memo). Sound because a CLIP object's weights never change:
        # ComfyUI's nodes clone a CLIP before patching it, and a clone gets its own encoder (clip_encoder)
        self.memo = {}
        probe = clip.tokenize("a", disable_weights=True, return_word_ids=True)
        self._key = next(iter(probe))
        window = probe[self._key][0]
        self.context_length, self.end_id = len(window), int(window[2][0])  # [start, "a", end, ...]
        _, feats = self.encode(["a"])
        self.dim = int(feats.shape[-1])

    @property
    def clip(self):
        return self._clip()

    def token_count(self, text: str) -> int:
        toks = self.clip.tokenize(text, disable_weights=True, return_word_ids=True)[self._key]
        return sum(1 for chunk in toks for t in chunk if t[2] != 0)

    def encode(self, prompts: list[str]):
        ids_all, feats_all = [], []
        for i in range(0, len(prompts), self.batch):
            part = prompts[i:i + self.batch]
            tokenized = [self.clip.tokenize(p, disable_weights=True) for p in part]
            merged = {k: [t[k][0] for t in tokenized] for k in tokenized[0]}
            cond = self.clip.encode_from_tokens(merged)
            n = len(part)
            feats_all.append(cond.reshape(n, self.context_length, cond.shape[-1]).float())
            ids_all += [[int(t[0]) for t in tk[self._key][0]] for tk in tokenized]
        return ids_all, torch.cat(feats_all)


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clip_encoder(clip) -> ClipEncoder:
    """One encoder per CLIP object, forgotten when ComfyUI frees that CLIP."""
    enc = _ENCODERS.get(clip)
    if enc is None:
        enc = _ENCODERS[clip] = ClipEncoder(clip)
    return enc


def clip_fingerprint(clip) -> str:
    return _fingerprint(clip.get_sd())


PROBE_PROMPTS = ["a photo of a dog on a beach", "an oil painting of an old man"]


def text_features_key(clip) -> str:
    """Identifies the per-token features this CLIP produces, for caches of statistics computed from them.

    The weights alone are not enough: a clone with another clip_layer (CLIP Set Last Layer), tokenizer options, or a
    LoRA on the text encoder shares the weights and gives other features. So the key holds the weights' fingerprint,
    the layer and tokenizer settings, and a digest of the features two probe prompts actually get (rounded to
    float16, so it names the encoder, not the last bits of one run).
    """
    enc = clip_encoder(clip)
    _, feats = enc.encode(PROBE_PROMPTS)
    h = hashlib.sha256()
    h.update(clip_fingerprint(clip).encode())
    h.update(repr((getattr(clip, "layer_idx", None), sorted(getattr(clip, "tokenizer_options", {}).items()))).encode())
    h.update(feats.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().flatten()
        sample = t[:: max(1, t.numel() // 256)].to("cpu", torch.float32)
        h.update(k.encode())
        h.update(str(tuple(tensors[k].shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- cache

def cache_dir() -> str:
    path = os.path.join(folder_paths.models_dir, "mace", "cache")
    os.makedirs(path, exist_ok=True)
    return path


_MEMO: dict[str, torch.Tensor] = {}


def cached_tensor(name: str, make) -> torch.Tensor:
    """A tensor computed once per name, kept in memory and as safetensors in the pack's cache folder."""
    if name in _MEMO:
        return _MEMO[name]
    path = os.path.join(cache_dir(), f"{name}.safetensors")
    value = None
    if os.path.isfile(path):
        try:
            value = load_file(path)["value"]
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("MACE: ignoring unreadable cache %s (%s)", path, e)
    if value is None:
        value = make()
        tmp = path + ".tmp"
        save_file({"value": value.contiguous().cpu()}, tmp)
        os.replace(tmp, path)
    _MEMO[name] = value
    return value


# ---------------------------------------------------------------- progress

class Progress:
    """ComfyUI's progress bar plus the cancel check, as the plain callable mace_core loops expect. Work that is
    thrown away and done again (a batch retried smaller after running out of memory) is rewound, not counted twice:
    the bar holds where it was until the redone work passes it, so it never moves back and is full only at the end."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.done = 0
        self.shown = 0

    def __call__(self, n: int = 1):
        mm.throw_exception_if_processing_interrupted()
        self.done += n
        if self.done > self.shown:
            self.shown = self.done
            self.bar.update_absolute(self.shown)

    def rewind(self, done: int):
        """Back to `done` units (a value of .done read before the work now thrown away)."""
        self.done = done


def check_cancel():
    mm.throw_exception_if_processing_interrupted()



def free_memory(patcher, loaded: bool) -> float:
    """Bytes a batch may still use on the model's device (ComfyUI's own count: free VRAM plus what torch caches, or
    available RAM on the CPU); a model not yet loaded will take its size from that."""
    free = mm.get_free_memory(patcher.load_device)
    return free if loaded else free - patcher.model_size()


def release_cached_memory():
    """After a batch that did not fit: hand the allocator's cached blocks back before a smaller batch tries."""
    mm.soft_empty_cache()


def inference_memory(model, latent_shape) -> float:
    """ComfyUI's estimate of one denoiser call's working memory at this latent batch shape (what its sampler plans
    batches with)."""
    return float(model.model.memory_required(list(latent_shape)))
