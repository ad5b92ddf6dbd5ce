"""ComfyUI internals for stage 2: cross-attention capture, trainable weight wrappers, the denoiser forward at a noised
latent, and training data made with ComfyUI's own sampler.

Everything here goes through ComfyUI's public ModelPatcher mechanisms (attn2 replace patches, weight wrappers,
load_models_gpu) on clones, so the MODEL a workflow passes in is never edited. When ComfyUI changes, this file and
host.py are what need mending.
"""

import logging
import re
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sample
import torch
from einops import rearrange

from ..mace_core.align import concept_positions
from ..mace_core.attention_loss import (
    MaskPyramid,
    attention_energy,
    attention_mass,
    layer_hw,
    mask_from_maps,
    mean_over_layers,
    sample_timesteps,
    suppressed_positions,
)
from . import host

log = logging.getLogger("MACE")

_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_WHERE = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}

# Images made for training when no latents are given: a short, plain sampler run, as a KSampler with defaults would.
GEN_STEPS = 20
GEN_CFG = 7.0
GEN_SAMPLER = "euler"
GEN_SCHEDULER = "normal"
DATA_TEMPLATE = {"style": "a painting in the style of {}"}  # every other family: "a photo of {}"
MASK_TIMESTEPS = (300, 500, 700)  # where layout is settled but the image is still noisy enough to be attended


def data_template(concept) -> str:
    return DATA_TEMPLATE.get(concept.family, "a photo of {}")


# ---------------------------------------------------------------- where the cross-attention layers are

def attn2_blocks(model) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every transformer block with cross-attention, the address
    set_model_attn2_replace expects (UNet families: SD1.x, SD2.x, SDXL)."""
    out = []
    for name, mod in model.model.diffusion_model.named_modules():
        blocks = getattr(mod, "transformer_blocks", None)
        m = _BLOCK.match(name + ".")
        if blocks is None or m is None:
            continue
        where = _WHERE[m.group(1)]
        number = 0 if where == "middle" else int(m.group(2))  # the UNet numbers its middle block 0
        out += [(where, number, i) for i, b in enumerate(blocks) if getattr(b, "attn2", None) is not None]
    return out


# ---------------------------------------------------------------- capture

class AttentionProbe:
    """attn2 replace patch that computes cross-attention itself, so softmax(q k^T / sqrt(d)) exists as a tensor (with
    gradient when enabled), and hands its columns at `positions` to `sink(probs, extra_options)`.

    The patch is one object shared by every layer; the caller sets `positions` and `sink` before each forward.
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.sink = None

    def __call__(self, q, k, v, extra_options):
        heads, d = extra_options["n_heads"], extra_options["dim_head"]
        qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
        # float32 logits whatever the model dtype: the loss squares small probabilities
        probs = (torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * d ** -0.5).softmax(-1)
        out = rearrange(torch.matmul(probs.to(vh.dtype), vh), "b h n d -> b n (h d)")
        if self.sink is not None and self.positions is not None:
            self.sink(probs.index_select(-1, self.positions.to(probs.device)), extra_options)
        return out


def probed_clone(model, probe: AttentionProbe):
    """A clone whose every cross-attention layer runs through `probe` (model_options only; weights untouched)."""
    clone = model.clone()
    blocks = attn2_blocks(model)
    if not blocks:
        raise RuntimeError("MACE: found no cross-attention transformer blocks in this model")
    for where, number, index in blocks:
        clone.set_model_attn2_replace(probe, where, number, index)
    return clone


# ---------------------------------------------------------------- trainable weights

class DetachedWeight:
    """Weight wrapper for every weight that is not trained: ComfyUI hands wrappers a fresh copy of the weight; cutting
    its autograd link keeps backward from ever reaching the shared module's parameters (which may be inference
    tensors from the executor, or require grad)."""

    def __call__(self, w):
        return w.detach()


class LoRAWeight:
    """Weight wrapper w -> w + up @ down with trainable factors; the factors are swapped per concept."""

    def __init__(self):
        self.up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None

    def __call__(self, w):
        w = w.detach()
        if self.up is None:
            return w
        return (w.float() + self.up.to(w.device) @ self.down.to(w.device)).to(w.dtype)


_OURS = (DetachedWeight, LoRAWeight)


class TrainableModel:
    """A clone of the incoming MODEL, loaded the way ComfyUI loads any model (so it computes with the model's current
    weights, patches included), whose attn2 to_k/to_v carry LoRA wrappers and whose cross-attention goes through a
    probe. release() unloads it and removes its wrappers, leaving the shared module as ComfyUI expects it."""

    def __init__(self, model, lora_keys: list[str]):
        self.probe = AttentionProbe()
        self.patcher = probed_clone(model, self.probe)
        self.loras = {k: LoRAWeight() for k in lora_keys}
        detached = DetachedWeight()
        dm = self.patcher.model.diffusion_model
        uncovered = []
        for name, mod in dm.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                key = f"diffusion_model.{name}.{pname}"
                if hasattr(mod, "weight_function"):
                    self.patcher.add_weight_wrapper(key, self.loras.get(key, detached))
                else:
                    uncovered.append(key)
        if uncovered:
            log.warning("MACE: %d UNet parameters are outside ComfyUI's ops (e.g. %s); training may fail if they "
                        "are inference tensors", len(uncovered), uncovered[0])
        if self.patcher.model.get_dtype() != torch.float32:
            # fp16 gradients through a whole UNet underflow without loss scaling, and fp8 has no arithmetic of its
            # own; the paper trains in fp32. ComfyUI's manual cast computes each layer in fp32 from the stored 16- or
            # 8-bit weights (an object patch, restored when the clone is unloaded).
            self.patcher.set_model_compute_dtype(torch.float32)
        missing = set(lora_keys) - set(self.patcher.weight_wrapper_patches)
        if missing:
            raise RuntimeError(f"MACE: cannot wrap {sorted(missing)[0]}")
        self.device = self.patcher.load_device

    def load(self):
        # must run under inference_mode(False): weights ComfyUI patches now become ordinary tensors
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def set_lora(self, up: dict[str, torch.Tensor] | None, down: dict[str, torch.Tensor] | None):
        for k, wrapper in self.loras.items():
            wrapper.up = None if up is None else up[k]
            wrapper.down = None if down is None else down[k]

    def release(self):
        self.set_lora(None, None)
        self.probe.sink = None
        release_patcher(self.patcher)
        for mod in self.patcher.model.diffusion_model.modules():
            for attr in ("weight_function", "bias_function"):
                fs = mod.__dict__.get(attr)
                if fs and any(isinstance(f, _OURS) for f in fs):
                    setattr(mod, attr, [f for f in fs if not isinstance(f, _OURS)])


def release_patcher(patcher):
    """Unload one clone the way ComfyUI unloads a model (weights restored from its backup)."""
    for lm in list(mm.current_loaded_models):
        if lm.model is patcher:
            mm.current_loaded_models.remove(lm)
            lm.model_unload()
            return
    current = patcher.model.current_weight_patches_uuid
    if current is not None and current == patcher.patches_uuid:  # loaded outside the model manager's list
        patcher.detach(unpatch_all=True)


# ---------------------------------------------------------------- conditioning and the denoiser forward

@dataclass
class Prompt:
    text: str
    ids: list[int]
    cond: torch.Tensor  # (1, tokens, dim)
    pooled: torch.Tensor | None
    positions: torch.Tensor  # token positions the loss suppresses: the concept's words, end token, padding
    words: torch.Tensor  # the concept's words alone


def encode_prompt(clip, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Per-token context (exactly what the UNet reads), pooled output, and token ids; no prompt-weight syntax."""
    tokens = clip.tokenize(text, disable_weights=True)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    ids = [int(t[0]) for t in tokens[next(iter(tokens))][0]]
    return ids, cond, pooled


def concept_prompts(clip, concept, templates: list[str], end_id: int, with_end: bool = True) -> list[Prompt]:
    """The concept's templated prompts with the positions to suppress, found against the same templates filled with
    the anchor (the tokens that differ are the concept's words)."""
    out = []
    for template in templates:
        text = template.format(concept.name)
        ids, cond, pooled = encode_prompt(clip, text)
        anchor_tokens = clip.tokenize(template.format(concept.anchor), disable_weights=True)
        anchor_ids = [int(t[0]) for t in anchor_tokens[next(iter(anchor_tokens))][0]]
        pos = suppressed_positions(ids, anchor_ids, end_id, with_end)
        words = concept_positions(ids, anchor_ids, end_id)
        out.append(Prompt(text, ids, cond, pooled, torch.tensor(pos, dtype=torch.long),
                          torch.tensor(words, dtype=torch.long)))
    return out


def model_conds(patcher, prompt: Prompt, latent_shape, device) -> dict:
    """apply_model's keyword conditioning for this model family (SDXL adds 'y' from the pooled output and sizes)."""
    b, _, h, w = latent_shape
    ratio = getattr(patcher.model.latent_format, "spacial_downscale_ratio", 8)
    conds = patcher.model.extra_conds(cross_attn=prompt.cond, pooled_output=prompt.pooled, width=w * ratio,
                                      height=h * ratio, device=device, noise=torch.zeros(latent_shape))
    return {name: c.process_cond(batch_size=b, device=device, area=None).cond.to(device) for name, c in conds.items()}


def denoise_forward(patcher, latent: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, conds: dict):
    """One denoiser call at latent noised to the given integer timesteps (latent already in model space)."""
    ms = patcher.model.model_sampling
    sigma = host.timestep_sigmas(patcher, timesteps).to(latent.device)  # not ms.sigma(t): EDM reads t otherwise
    x = ms.noise_scaling(sigma, noise, latent)
    kw = dict(conds)
    c_crossattn, c_concat = kw.pop("c_crossattn"), kw.pop("c_concat", None)
    return patcher.model.apply_model(x, sigma, c_concat=c_concat, c_crossattn=c_crossattn,
                                     transformer_options=patcher.model_options["transformer_options"], **kw)


# ---------------------------------------------------------------- training data

def default_image_size(model) -> int:
    """The model's own training size (host.default_image_size: SD1.x 512, SD2.x 768-v 768, SDXL 1024)."""
    return host.default_image_size(model)


def generate_latents(model, clip, text: str, count: int, size: int, seed: int, on_step=None) -> torch.Tensor:
    """`count` images of `text` made with the incoming model through ComfyUI's KSampler machinery (seeded, CFG
    against the empty prompt); returns LATENT samples as a KSampler would output them. `on_step()` is called after
    each of the GEN_STEPS sampler steps (progress; it may raise to cancel)."""
    ratio = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    empty = torch.zeros([count, 4, size // ratio, size // ratio])
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text, disable_weights=True))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("", disable_weights=True))
    noise = comfy.sample.prepare_noise(latent, seed)
    step = on_step or host.check_cancel
    return comfy.sample.sample(model, noise, GEN_STEPS, GEN_CFG, GEN_SAMPLER, GEN_SCHEDULER, positive, negative,
                               latent, seed=seed, disable_pbar=True, callback=lambda *a: step())


# ---------------------------------------------------------------- attention measurements (no gradient)

def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def attention_maps(model, prompt: Prompt, latents: torch.Tensor, timesteps=MASK_TIMESTEPS, seed: int = 0):
    """Per image, the attention each layer pays to the prompt's selected tokens (summed over them, averaged over
    heads), at several noise levels: a list of (b, h_l, w_l) maps. latents: LATENT samples (b, c, H, W)."""
    probe = AttentionProbe()
    clone = probed_clone(model, probe)
    mm.load_models_gpu([clone])
    dev = clone.load_device
    x0 = clone.model.process_latent_in(latents.to(dev).float())
    conds = model_conds(clone, prompt, x0.shape, dev)
    maps = []

    def sink(probs, extra_options):
        H, W = extra_options["original_shape"][-2:]
        h, w = layer_hw(H, W, probs.shape[2])
        # probs: (batch, heads, pixels, tokens); the map sums the tokens and averages the heads
        maps.append(rearrange(probs.sum(-1).mean(1), "b (h w) -> b h w", h=h, w=w).float())

    probe.positions, probe.sink = prompt.positions, sink
    for j, t in enumerate(timesteps):
        host.check_cancel()
        ts = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        denoise_forward(clone, x0, _noise(x0.shape, seed + j).to(dev), ts, conds)
    return maps


def derive_masks(model, prompt: Prompt, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Concept masks (b, H, W) at latent resolution from the model's own cross-attention to the concept's words
    (no segmentation model): averaged over layers, heads and timesteps, thresholded at each image's mean."""
    words = Prompt(prompt.text, prompt.ids, prompt.cond, prompt.pooled, prompt.words, prompt.words)
    maps = attention_maps(model, words, latents, seed=seed)
    return mask_from_maps(maps, tuple(latents.shape[-2:]))


@torch.no_grad()
def concept_attention_mass(model, prompt: Prompt, latents: torch.Tensor, mask: torch.Tensor, timesteps,
                           seed: int = 0) -> float:
    """Mean attention mass on the prompt's selected tokens inside the mask (latent resolution), over layers, heads
    and the given timesteps: the quantity training drives down, as a plain number for tests and logs."""
    probe = AttentionProbe()
    clone = probed_clone(model, probe)
    mm.load_models_gpu([clone])
    dev = clone.load_device
    x0 = clone.model.process_latent_in(latents.to(dev).float())
    conds = model_conds(clone, prompt, x0.shape, dev)
    pyramid = MaskPyramid(mask.to(dev).float(), tuple(x0.shape[-2:]))
    terms = []
    probe.positions = prompt.positions
    probe.sink = lambda probs, eo: terms.append(attention_mass(probs, pyramid.at(probs.shape[2])))
    for j, t in enumerate(timesteps):
        ts = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        denoise_forward(clone, x0, _noise(x0.shape, seed + j).to(dev), ts, conds)
    return float(mean_over_layers(terms))


# ---------------------------------------------------------------- one concept's training task

class ConceptTask:
    """mace_core.train.ConceptTask over a TrainableModel: each step draws an image, a prompt, a timestep and noise,
    runs the denoiser with this concept's LoRA, and returns the masked attention energy of the suppressed tokens."""

    def __init__(self, tm: TrainableModel, prompts: list[Prompt], latents: torch.Tensor, masks: torch.Tensor,
                 up: dict, down: dict, timestep_kind: str):
        dev = tm.device
        self.tm, self.prompts, self.kind = tm, prompts, timestep_kind
        self.up, self.down = up, down
        # data made under the executor's inference mode: clone into ordinary tensors autograd may save
        self.x0 = tm.patcher.model.process_latent_in(latents.to(dev).float()).clone()
        self.masks = [MaskPyramid(masks[i:i + 1].to(dev).float().clone(), tuple(self.x0.shape[-2:]))
                      for i in range(masks.shape[0])]
        self.conds = [{k: v.clone() for k, v in model_conds(tm.patcher, p, (1,) + tuple(self.x0.shape[1:]),
                                                            dev).items()} for p in prompts]
        self.positions = [p.positions.to(dev).clone() for p in prompts]

    def parameters(self):
        return list(self.up.values()) + list(self.down.values())

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        i = int(torch.randint(self.x0.shape[0], (1,), generator=generator))
        j = int(torch.randint(len(self.prompts), (1,), generator=generator))
        t = sample_timesteps(self.kind, 1, generator)
        noise = torch.randn((1,) + tuple(self.x0.shape[1:]), generator=generator).to(self.x0.device)
        terms = []
        mask = self.masks[i]
        probe = self.tm.probe
        probe.positions = self.positions[j]
        probe.sink = lambda probs, eo: terms.append(attention_energy(probs, mask.at(probs.shape[2])))
        try:
            self.tm.set_lora(self.up, self.down)
            denoise_forward(self.tm.patcher, self.x0[i:i + 1], noise, t, self.conds[j])
        finally:
            probe.sink = None
        return mean_over_layers(terms)
