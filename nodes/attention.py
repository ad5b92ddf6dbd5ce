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
    attention_energy_per_sample,
    attention_mass,
    layer_hw,
    mask_from_maps,
    mean_over_layers,
    sample_timesteps,
    suppressed_positions,
)
from . import host
from .frozen_weights import DetachedWeight, WeightCopies

log = logging.getLogger("MACE")

_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_WHERE = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}

# How Train makes its images when no latents are given (its image_* inputs' defaults): as the paper made them, 30
# DPM-Solver++ steps (diffusers' multistep solver, second order: ComfyUI's dpmpp_2m) at guidance 7.5, on the model's
# own noise schedule. Changing a default changes every concept's data: bump train.RESUME_VERSION with it.
GEN_STEPS = 30
GEN_CFG = 7.5
GEN_SAMPLER = "dpmpp_2m"
GEN_SCHEDULER = "normal"
# Samplers that draw no noise of their own and treat every sample alone, so a batch of several concepts' images gives
# each the images it gets alone. Any other sampler (ancestral, SDE, LCM, adaptive steps) samples one concept at a time.
BATCHABLE_SAMPLERS = frozenset({
    "euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v",
    "deis", "res_multistep", "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "uni_pc",
    "uni_pc_bh2", "ddim",
})


@dataclass(frozen=True)
class ImageSampling:
    """The sampler run that makes Train's images: KSampler's settings, Train's image_* inputs."""
    steps: int = GEN_STEPS
    cfg: float = GEN_CFG
    sampler: str = GEN_SAMPLER
    scheduler: str = GEN_SCHEDULER

    def batchable(self) -> bool:
        return self.sampler in BATCHABLE_SAMPLERS
DATA_TEMPLATE = {"style": "a painting in the style of {}"}  # every other concept type: "a photo of {}"
MASK_TIMESTEPS = (300, 500, 700)  # where layout is settled but the image is still noisy enough to be attended


def data_template(concept) -> str:
    return DATA_TEMPLATE.get(concept.concept_type, "a photo of {}")


# ---------------------------------------------------------------- where the cross-attention layers are

def attn2_layers(model) -> list[tuple[tuple[str, int, int], str]]:
    """(address, key prefix) of every transformer block with cross-attention: the (block name, block number,
    transformer index) set_model_attn2_replace expects (UNet families: SD1.x, SD2.x, SDXL), and its attn2's weight
    key prefix ('diffusion_model.<module>.attn2')."""
    out = []
    for name, mod in model.model.diffusion_model.named_modules():
        blocks = getattr(mod, "transformer_blocks", None)
        m = _BLOCK.match(name + ".")
        if blocks is None or m is None:
            continue
        where = _WHERE[m.group(1)]
        number = 0 if where == "middle" else int(m.group(2))  # the UNet numbers its middle block 0
        out += [((where, number, i), f"diffusion_model.{name}.transformer_blocks.{i}.attn2")
                for i, b in enumerate(blocks) if getattr(b, "attn2", None) is not None]
    return out


def attn2_blocks(model) -> list[tuple[str, int, int]]:
    return [address for address, _ in attn2_layers(model)]


# ---------------------------------------------------------------- capture

class AttentionProbe:
    """attn2 replace patch that computes cross-attention itself, so softmax(q k^T / sqrt(d)) exists as a tensor (with
    gradient when enabled), and hands its columns at `positions` to `sink(probs, extra_options)`.

    The patch is one object shared by every layer; the caller sets `positions` and `sink` before each forward.
    A batch whose samples carry different prompts sets `token_weights` (batch, tokens) instead, 1 at each sample's
    own positions: the sink then gets every column, zero outside them (sums and squares over tokens are unchanged).
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.token_weights: torch.Tensor | None = None
        self.sink = None

    def __call__(self, q, k, v, extra_options):
        heads, d = extra_options["n_heads"], extra_options["dim_head"]
        qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
        # float32 logits whatever the model dtype: the loss squares small probabilities
        probs = (torch.matmul(qh.float(), kh.float().transpose(-1, -2)) * d ** -0.5).softmax(-1)
        out = rearrange(torch.matmul(probs.to(vh.dtype), vh), "b h n d -> b n (h d)")
        if self.sink is not None and self.token_weights is not None:
            self.sink(probs * self.token_weights.to(probs.device)[:, None, None, :], extra_options)
        elif self.sink is not None and self.positions is not None:
            self.sink(probs.index_select(-1, self.positions.to(probs.device)), extra_options)
        return out


def token_weights(prompt, length: int) -> torch.Tensor:
    """(length,) float: 1 at the prompt's selected positions (AttentionProbe.token_weights rows)."""
    w = torch.zeros(length)
    w[prompt.positions] = 1.0
    return w


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

_OURS = (DetachedWeight,)


class BatchedLoRA:
    """The LoRA updates of a batch of concepts on every attn2 to_k/to_v: row b of the batch carries concept b's
    factors, so K concepts train in one forward and backward pass of one model (a batched low-rank product,
    k_b = W c_b + up_b (down_b c_b), not K weight copies). Factors per key: up (K, out, r), down (K, r, in).

    ComfyUI's attn2 replace patch receives k and v already projected, so the attn2_patch hook (called with the
    context just before the projections, in the same block) stashes the context for the replace patch to use."""

    def __init__(self):
        self.up: dict[str, torch.Tensor] | None = None
        self.down: dict[str, torch.Tensor] | None = None
        self.context = self.value = None

    def stash(self, n, context, value, extra_options):  # attn2_patch: the inputs of to_k and to_v
        self.context, self.value = context, value
        return n, context, value

    def add(self, key: str, projected: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.up is None:
            return projected
        up, down = self.up[key], self.down[key]
        if x.shape[0] != up.shape[0]:
            raise RuntimeError(f"MACE: a batch of {x.shape[0]} samples for {up.shape[0]} concepts' LoRAs")
        # float32 like the model's compute (fp16 weights are cast up, see TrainableModel)
        term = torch.bmm(torch.bmm(x.float(), down.transpose(1, 2)), up.transpose(1, 2))
        return (projected.float() + term).to(projected.dtype)


class _LoRAAttention:
    """attn2 replace patch of one layer: its concepts' LoRA terms on k and v, then the shared probe."""

    def __init__(self, probe: AttentionProbe, lora: BatchedLoRA, prefix: str):
        self.probe, self.lora = probe, lora
        self.k_key, self.v_key = prefix + ".to_k.weight", prefix + ".to_v.weight"

    def __call__(self, q, k, v, extra_options):
        lora = self.lora
        k = lora.add(self.k_key, k, lora.context)
        v = lora.add(self.v_key, v, lora.value if lora.value is not None else lora.context)
        lora.context = lora.value = None  # each layer stashes its own
        return self.probe(q, k, v, extra_options)


class TrainableModel:
    """A clone of the incoming MODEL, loaded the way ComfyUI loads any model (so it computes with the model's current
    weights, patches included), whose cross-attention adds a batch of concepts' LoRA updates to k and v and goes
    through a probe. release() unloads it and removes its wrappers, leaving the shared module as ComfyUI expects it."""

    def __init__(self, model, lora_keys: list[str]):
        self.probe = AttentionProbe()
        self.lora = BatchedLoRA()
        self.patcher = host.training_clone(model)
        layers = attn2_layers(model)
        if not layers:
            raise RuntimeError("MACE: found no cross-attention transformer blocks in this model")
        covered = {prefix + f".to_{kv}.weight" for _, prefix in layers for kv in "kv"}
        missing = set(lora_keys) - covered
        if missing:
            raise RuntimeError(f"MACE: cannot train {sorted(missing)[0]}: no cross-attention layer reads it")
        for address, prefix in layers:
            self.patcher.set_model_attn2_replace(_LoRAAttention(self.probe, self.lora, prefix), *address)
        self.patcher.set_model_attn2_patch(self.lora.stash)  # appended last: sees the context the model's own use
        self.copies = WeightCopies()  # BatchTask's forwards run under copies.saving()
        detached = DetachedWeight()
        dm = self.patcher.model.diffusion_model
        uncovered = []
        for name, mod in dm.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                key = f"diffusion_model.{name}.{pname}"
                if hasattr(mod, "weight_function"):
                    wrapper = DetachedWeight(self.copies, mod) if pname == "weight" else detached
                    self.patcher.add_weight_wrapper(key, wrapper)
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
        self.device = self.patcher.load_device

    def load(self):
        # must run under inference_mode(False): weights ComfyUI patches now become ordinary tensors
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def set_lora(self, up: dict[str, torch.Tensor] | None, down: dict[str, torch.Tensor] | None):
        """Factors per key, stacked over the batch's concepts (K, out, r) / (K, r, in); one concept's (out, r) /
        (r, in) is a batch of one. None: no update."""
        if up is None or down is None:
            self.lora.up = self.lora.down = None
            return
        self.lora.up = {k: u if u.ndim == 3 else u[None] for k, u in up.items()}
        self.lora.down = {k: d if d.ndim == 3 else d[None] for k, d in down.items()}

    def release(self):
        self.set_lora(None, None)
        self.probe.sink = None
        self.probe.token_weights = None
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


def generate_latents(model, clip, text: str, count: int, size: int, seed: int, on_step=None,
                     sampling: ImageSampling = ImageSampling()) -> torch.Tensor:
    """`count` images of `text` made with the incoming model through ComfyUI's KSampler machinery (seeded, CFG
    against the empty prompt); returns LATENT samples as a KSampler would output them. `on_step(1)` is called after
    each of the sampler's steps (progress; it may raise to cancel)."""
    return generate_latents_batch(model, clip, [text], count, size, [seed], on_step, sampling)[0]


def _batched_positive(clip, texts: list[str], count: int):
    """One conditioning entry whose tensors hold each text's cond `count` times, in the texts' order, so one sampler
    run draws every text's images (ComfyUI keeps a cond whose batch equals the latent batch as it is). None when the
    CLIP's hooks schedule several conds per prompt: those are sampled one text at a time."""
    entries = [clip.encode_from_tokens_scheduled(clip.tokenize(t, disable_weights=True)) for t in texts]
    if any(len(e) != 1 for e in entries):
        return None
    cond = torch.cat([e[0][0].repeat_interleave(count, 0) if e[0][0].shape[0] == 1 else e[0][0] for e in entries])
    extra = dict(entries[0][0][1])
    for name, value in extra.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == 1:
            extra[name] = torch.cat([e[0][1][name].repeat_interleave(count, 0) for e in entries])
    return [[cond, extra]]


def generate_latents_batch(model, clip, texts: list[str], count: int, size: int, seeds: list[int],
                           on_step=None, sampling: ImageSampling = ImageSampling()) -> list[torch.Tensor]:
    """`count` images of each text in one sampler run; text i's images are those generate_latents(text i, seed i)
    makes alone: its noise is drawn from its own seed (comfy.sample.prepare_noise seeds one generator per batch, so
    the batch's noise is built per text), and every sample carries its own text's cond. `on_step(texts)` is called
    after each sampler step with the number of texts that step served (all of them in one run; 1 where the texts run
    one at a time), so a progress count of texts x steps ends full either way. Returns one LATENT samples tensor
    (count, c, h, w) per text. A sampler that draws noise as it goes (not sampling.batchable()) runs one text at a
    time, from that text's seed."""
    if len(texts) > 1 and not sampling.batchable():
        return [generate_latents_batch(model, clip, [t], count, size, [s], on_step, sampling)[0]
                for t, s in zip(texts, seeds)]
    ratio = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    empty = torch.zeros([count, 4, size // ratio, size // ratio])
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    positive = _batched_positive(clip, texts, count) if len(texts) > 1 else \
        clip.encode_from_tokens_scheduled(clip.tokenize(texts[0], disable_weights=True))
    if positive is None:
        return [generate_latents_batch(model, clip, [t], count, size, [s], on_step, sampling)[0]
                for t, s in zip(texts, seeds)]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("", disable_weights=True))
    noise = torch.cat([comfy.sample.prepare_noise(latent, s) for s in seeds])
    batch = latent.repeat_interleave(len(texts), 0) if len(texts) > 1 else latent
    step = on_step or (lambda _: host.check_cancel())
    # the sampler's own seed feeds only the noise a sampler draws as it goes: a batch of several texts never has any
    out = comfy.sample.sample(model, noise, sampling.steps, sampling.cfg, sampling.sampler, sampling.scheduler,
                              positive, negative, batch, seed=seeds[0], disable_pbar=True,
                              callback=lambda *a: step(len(texts)))
    return list(out.split(count))


# ---------------------------------------------------------------- attention measurements (no gradient)

def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def stacked_conds(patcher, prompts: list[Prompt], counts: list[int], latent_shape, device) -> dict:
    """apply_model's conditioning for a batch whose samples carry different prompts: prompt i's conds `counts[i]`
    times, in order (model_conds per prompt, concatenated in the batch dimension)."""
    one = (1,) + tuple(latent_shape[1:])
    per = [model_conds(patcher, p, one, device) for p in prompts]
    return {name: torch.cat([c[name].expand(n, *c[name].shape[1:]) for c, n in zip(per, counts)])
            for name in per[0]}


@torch.no_grad()
def attention_maps(model, prompt: Prompt, latents: torch.Tensor, timesteps=MASK_TIMESTEPS, seed: int = 0):
    """Per image, the attention each layer pays to the prompt's selected tokens (summed over them, averaged over
    heads), at several noise levels: a list of (b, h_l, w_l) maps. latents: LATENT samples (b, c, H, W)."""
    return attention_maps_batch(model, [prompt], [latents], timesteps, [seed])


@torch.no_grad()
def attention_maps_batch(model, prompts: list[Prompt], latents: list[torch.Tensor], timesteps=MASK_TIMESTEPS,
                         seeds: list[int] = (0,)):
    """attention_maps of several (prompt, latents, seed) groups in one forward per timestep: the maps' batch holds
    the groups' images in order. Group i's noise at timestep j comes from seed i + j, as it would alone."""
    probe = AttentionProbe()
    clone = probed_clone(model, probe)
    mm.load_models_gpu([clone])
    dev = clone.load_device
    x0 = clone.model.process_latent_in(torch.cat(latents).to(dev).float())
    counts = [lat.shape[0] for lat in latents]
    conds = stacked_conds(clone, prompts, counts, x0.shape, dev)
    maps = []

    def sink(probs, extra_options):
        H, W = extra_options["original_shape"][-2:]
        h, w = layer_hw(H, W, probs.shape[2])
        # probs: (batch, heads, pixels, tokens); the map sums the tokens and averages the heads
        maps.append(rearrange(probs.sum(-1).mean(1), "b (h w) -> b h w", h=h, w=w).float())

    if len(prompts) == 1:
        probe.positions = prompts[0].positions
    else:
        length = prompts[0].cond.shape[1]
        probe.token_weights = torch.cat([token_weights(p, length)[None].expand(n, -1)
                                         for p, n in zip(prompts, counts)]).to(dev)
    probe.sink = sink
    for j, t in enumerate(timesteps):
        host.check_cancel()
        ts = torch.full((x0.shape[0],), int(t), dtype=torch.long)
        noise = torch.cat([_noise((n,) + tuple(x0.shape[1:]), s + j) for n, s in zip(counts, seeds)])
        denoise_forward(clone, x0, noise.to(dev), ts, conds)
    return maps


def derive_masks(model, prompt: Prompt, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Concept masks (b, H, W) at latent resolution from the model's own cross-attention to the concept's words
    (no segmentation model): averaged over layers, heads and timesteps, thresholded at each image's mean."""
    return derive_masks_batch(model, [prompt], [latents], [seed])[0]


def derive_masks_batch(model, prompts: list[Prompt], latents: list[torch.Tensor], seeds: list[int]):
    """derive_masks of several concepts in one batch (each image's mask is thresholded on its own maps)."""
    words = [Prompt(p.text, p.ids, p.cond, p.pooled, p.words, p.words) for p in prompts]
    maps = attention_maps_batch(model, words, latents, seeds=seeds)
    masks = mask_from_maps(maps, tuple(latents[0].shape[-2:]))
    return list(masks.split([lat.shape[0] for lat in latents]))


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


# ---------------------------------------------------------------- a batch of concepts' training task

@dataclass
class ConceptData:
    """One concept's training data as BatchTask reads it."""
    prompts: list[Prompt]
    latents: torch.Tensor  # LATENT samples (n, c, H, W)
    masks: torch.Tensor  # (n, h, w) in [0, 1]
    timestep_kind: str


class BatchTask:
    """mace_core.train.BatchTask over a TrainableModel: each step, every concept draws its own image, prompt,
    timestep and noise from its own generator (in the order a concept trained alone draws them), the batch runs
    through the denoiser once with each sample carrying its concept's LoRA, and the result is each concept's masked
    attention energy of its suppressed tokens. Samples never mix in a UNet (normalisation, attention and convolution
    all work per sample), so concept k's loss depends on its own LoRA only.

    up/down: per key, the concepts' factors stacked (K, out, r) / (K, r, in), leaf tensors with requires_grad."""

    def __init__(self, tm: TrainableModel, concepts: list[ConceptData], up: dict, down: dict):
        dev = tm.device
        self.tm, self.up, self.down = tm, up, down
        self.kinds = [c.timestep_kind for c in concepts]
        # data made under the executor's inference mode: clone into ordinary tensors autograd may save
        self.x0 = [tm.patcher.model.process_latent_in(c.latents.to(dev).float()).clone() for c in concepts]
        shape = tuple(self.x0[0].shape[1:])
        self.masks = [[MaskPyramid(c.masks[i:i + 1].to(dev).float().clone(), shape[-2:])
                       for i in range(c.masks.shape[0])] for c in concepts]
        self.conds = [[{k: v.clone() for k, v in model_conds(tm.patcher, p, (1,) + shape, dev).items()}
                       for p in c.prompts] for c in concepts]
        length = concepts[0].prompts[0].cond.shape[1]
        self.weights = [[token_weights(p, length).to(dev) for p in c.prompts] for c in concepts]
        self.shape = shape

    def parameters(self):
        return list(self.up.values()) + list(self.down.values())

    def losses(self, step: int, generators: list[torch.Generator]) -> torch.Tensor:
        picks, noises, ts = [], [], []
        for c, gen in enumerate(generators):
            i = int(torch.randint(self.x0[c].shape[0], (1,), generator=gen))
            j = int(torch.randint(len(self.conds[c]), (1,), generator=gen))
            ts.append(sample_timesteps(self.kinds[c], 1, gen))
            noises.append(torch.randn((1,) + self.shape, generator=gen))
            picks.append((i, j))
        dev = self.x0[0].device
        x0 = torch.cat([self.x0[c][i:i + 1] for c, (i, _) in enumerate(picks)])
        conds = {k: torch.cat([self.conds[c][j][k] for c, (_, j) in enumerate(picks)]) for k in self.conds[0][0]}
        pyramids = [self.masks[c][i] for c, (i, _) in enumerate(picks)]
        masks: dict[int, torch.Tensor] = {}

        def mask_at(pixels):
            if pixels not in masks:
                masks[pixels] = torch.cat([p.at(pixels) for p in pyramids])
            return masks[pixels]

        terms = []
        probe = self.tm.probe
        probe.token_weights = torch.stack([self.weights[c][j] for c, (_, j) in enumerate(picks)])
        probe.sink = lambda probs, eo: terms.append(attention_energy_per_sample(probs, mask_at(probs.shape[2])))
        try:
            self.tm.set_lora(self.up, self.down)
            with self.tm.copies.saving():  # backward remakes the frozen weights' copies instead of keeping them
                denoise_forward(self.tm.patcher, x0, torch.cat(noises).to(dev), torch.cat(ts), conds)
        finally:
            probe.sink = probe.token_weights = None
            self.tm.set_lora(None, None)
        if not terms:
            raise RuntimeError("no cross-attention layer was captured; the model has no usable attn2 layers")
        return torch.stack(terms).mean(0)
