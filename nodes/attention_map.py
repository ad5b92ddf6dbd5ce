"""MACE Attention Map: where a concept's words are attended, before and after erasure, as a heatmap IMAGE."""

import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..mace_core.attention_loss import resize_mask
from ..mace_core.errors import MaceInputError
from . import attention, host, inputs, picture, sampling
from .inputs import concept_list_input, latent_samples, stage_list
from .train import mask_mode

log = logging.getLogger("MACE")

WORDS = "concept words"
SUPPRESSED = "words + end/padding"
TOKENS = (WORDS, SUPPRESSED)


class MACEAttentionMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEAttentionMap",
            display_name="MACE Attention Map",
            category="MACE",
            description="Shows, for each concept of the list, how much every pixel of a picture of it attends to the "
                        "concept's words in the cross-attention (all layers and heads, a few noise levels), side by "
                        "side for the original and the erased model on one colour scale, with the share inside the "
                        "concept's region written under each map, and the region (mask) training uses. After MACE "
                        "the concept's attention inside its region falls. The picture is drawn by the original model, "
                        "unless latents are given.",
            inputs=[
                io.Model.Input("model", tooltip="The original model, before erasure; it also draws the pictures and "
                                                "gives the masks."),
                io.Model.Input("erased_model", tooltip="The erased model (MACE Erase, or Refine/Fuse)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with the model."),
                io.Vae.Input("vae", tooltip="The VAE loaded with the model, to decode the pictures."),
                *inputs.concept_inputs(),
                io.Combo.Input("tokens", options=list(TOKENS), default=WORDS,
                               tooltip="Which prompt tokens' attention is shown. concept words: the concept's own "
                                       "tokens. words + end/padding: also the end and padding tokens, which summarise "
                                       "the prompt; that is what MACE's training suppresses."),
                io.Boolean.Input("show_mask", default=True,
                                 tooltip="Add a column with the region training would use for the concept (derived "
                                         "from the original model's attention; the whole picture for styles)."),
                # stated, not left to the frontend: it adds a control widget to any 'seed' anyway, and the workflow
                # generator must know it is there (else saved widget values shift by one after the seed)
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the generated pictures and of the noise the maps are measured at."),
                *sampling.sampler_inputs(" Ignored when latents are given."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Optional pictures to measure on, as latents: one per concept in list order, "
                                        "or one for all. Default: one picture per concept by the original model."),
                inputs.concept_file_input(),
                concept_list_input(),
            ],
            outputs=[
                io.Image.Output("image", display_name="image",
                                tooltip="One row per concept: picture, attention before, attention after, mask."),
                io.Mask.Output("mask", display_name="mask",
                               tooltip="The concepts' masks at picture resolution, one per concept."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", **kwargs):
        return inputs.concept_file_fingerprint(concept_file)

    @classmethod
    def execute(cls, model, erased_model, clip, vae, concepts, concept_type, anchor, tokens, show_mask, seed, steps,
                cfg, sampler_name, scheduler, image_size, latents=None, concept_file="", concept_list=None):
        r = attention_map(model, erased_model, clip, vae, concepts, concept_type, anchor, tokens, show_mask, seed,
                          steps, cfg, sampler_name, scheduler, image_size, latents, concept_file or "", concept_list)
        return io.NodeOutput(r.image, r.masks)


@dataclass
class MapResult:
    image: torch.Tensor  # IMAGE (1, H, W, 3)
    layout: picture.GridLayout
    pictures: torch.Tensor  # (n, H, W, 3) what was measured
    heat: torch.Tensor  # (n, 2, H, W) attention before / after, at picture resolution
    masks: torch.Tensor  # (n, H, W) in {0, 1}
    mass: torch.Tensor  # (n, 2) mean attention inside the mask before / after (layers, heads, noise levels)
    names: list[str]
    col_labels: list[str]


def _given_latents(latents, n, model):
    samples = latent_samples(latents, model)
    if samples.shape[0] not in (1, n):
        raise MaceInputError("latents", f"hold {samples.shape[0]} pictures for {n} concepts.",
                             "Give one per concept, in list order, or one for all.")
    return [samples[j:j + 1] for j in (range(n) if samples.shape[0] == n else [0] * n)]


def _measure(model, prompt, lat, mask, hw, seed):
    """(heat (H, W), mean attention inside the mask) of one model over layers, heads and the mask timesteps."""
    maps = attention.attention_maps(model, prompt, lat, seed=seed)
    heat = torch.stack([picture.resize_map(m.cpu(), hw)[0] for m in maps]).mean(0)
    inside = []
    for m in maps:
        w = resize_mask(mask[None].float(), tuple(m.shape[-2:]))[0]  # the mask at this layer's resolution
        inside.append(float((m.cpu()[0].flatten() * w).sum() / w.sum().clamp_min(1e-6)))
    return heat, sum(inside) / len(inside)


def attention_map(model, erased_model, clip, vae, concepts, concept_type="celebrity", anchor="", tokens=WORDS,
                  show_mask=True, seed=0, steps=20, cfg=sampling.DEFAULT_CFG, sampler_name="euler", scheduler="normal",
                  image_size=0, latents=None, concept_file="", concept_list=None) -> MapResult:
    if tokens not in TOKENS:
        raise MaceInputError("tokens", f"unknown value '{tokens}'.", f"Use one of: {', '.join(TOKENS)}.")
    items = list(stage_list(concept_list, "MACE Attention Map", concepts, concept_type, anchor, concept_file).concepts)
    host.cross_attention_keys(model, clip)
    host.cross_attention_keys(erased_model, clip)
    enc = host.clip_encoder(clip)
    given = _given_latents(latents, len(items), model) if latents is not None else None
    size = sampling.picture_size(model, image_size)
    # progress: each sampler step of a generated picture, then one tick per concept's measurements
    progress = host.Progress(len(items) * ((0 if given else steps) + 1))
    sampler = sampling.Sampler(clip, steps, cfg, sampler_name, scheduler, size, on_step=progress)
    rows, heats, masks, masses, pics = [], [], [], [], []
    for i, c in enumerate(items):
        prompt = attention.concept_prompts(clip, c, [attention.data_template(c)], enc.end_id)[0]
        lat = given[i] if given else sampler.latents(model, prompt.text, [seed + i])
        img = sampling.decode(vae, lat)[0]
        hw = tuple(img.shape[:2])
        # the mask as Train's 'auto' makes it: the original model's attention to the concept's words, or everything
        if mask_mode("auto", c.concept_type, False) == "whole image":
            mask = torch.ones(tuple(lat.shape[-2:]))
        else:
            mask = attention.derive_masks(model, prompt, lat, seed=seed + i)[0].cpu()
        shown = prompt if tokens == SUPPRESSED else attention.Prompt(prompt.text, prompt.ids, prompt.cond,
                                                                     prompt.pooled, prompt.words, prompt.words)
        before, m0 = _measure(model, shown, lat, mask, hw, seed + i)
        after, m1 = _measure(erased_model, shown, lat, mask, hw, seed + i)
        big_mask = (picture.resize_map(mask[None], hw)[0] > 0.5).float()
        vmax = float(torch.maximum(before.max(), after.max()))
        row = [img, picture.overlay(img, before, vmax), picture.overlay(img, after, vmax)]
        if show_mask:
            row.append(picture.mask_picture(img, big_mask))
        rows.append(torch.stack(row))
        heats.append(torch.stack([before, after]))
        masks.append(big_mask)
        masses.append((m0, m1))
        pics.append(img)
        log.info("MACE attention map: '%s': attention inside its mask %.4f before, %.4f after (%s)", c.name, m0, m1,
                 tokens)
        progress()
    mass = torch.tensor(masses)
    captions = [["", f"in mask {m0:.3f}", f"in mask {m1:.3f}"] + ([f"{100 * float(m.mean()):.0f}% of pixels"]
                                                                 if show_mask else [])
                for (m0, m1), m in zip(masses, masks)]
    col_labels = ["picture", "attention before", "attention after"] + (["mask (training)"] if show_mask else [])
    image, layout = picture.grid(torch.stack(rows), [c.name for c in items], col_labels, captions)
    return MapResult(image, layout, torch.stack(pics), torch.stack(heats), torch.stack(masks), mass,
                     [c.name for c in items], col_labels)


NODES = [MACEAttentionMap]
