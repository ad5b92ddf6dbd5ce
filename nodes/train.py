"""MACE Train Concept LoRA: stage 2 as a node (one attention-suppressing LoRA per concept)."""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from ..mace_core import lora_files
from ..mace_core.attention_loss import TIMESTEP_KINDS, check_mask
from ..mace_core.closed_form import WeightDeltas
from ..mace_core.concepts import PRESETS, describe_presets
from ..mace_core.errors import MaceInputError
from ..mace_core.lora_bundle import ConceptLoRA, LoRABundle
from ..mace_core.text import check_concepts
from ..mace_core.train import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_STEPS,
    DEFAULT_TIMESTEPS,
    LEARNING_RATE_MAX,
    LEARNING_RATE_MIN,
    PER_TYPE,
    SETTINGS,
    STEPS_MAX,
    STEPS_MIN,
    TrainConfig,
    check_learning_rate,
    check_settings,
    check_steps,
    concept_generator,
    concept_settings,
    init_lora,
    same_optimiser,
    train_batch,
)
from . import attention, host
from .inputs import (
    MaceLoras,
    concept_file_fingerprint,
    concept_file_input,
    concept_inputs,
    concept_list_input,
    latent_samples,
    stage_list,
)
from .loras import inside, loras_root, slug
from .sampling import check_image_sampling, image_sampling, image_sampling_inputs

log = logging.getLogger("MACE")

MASK_SOURCES = ("auto", "given", "attention", "whole image")


@dataclass(frozen=True, eq=False)
class TrainRequest:
    """What MACE Train Concept LoRA is asked for, as one object from the node to every step of the run: the node's
    inputs by their ids, with the node's defaults. Frozen, so no step changes what a later step reads; what a step
    derives (the checked latents and mask, each concept's settings) it keeps as its own. eq=False: requests hold
    tensors and models, which have no value equality."""
    concepts: str = ""
    concept_type: str = "celebrity"
    anchor: str = ""
    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    rank: int = 1
    seed: int = 0
    timestep_sampling: str = DEFAULT_TIMESTEPS
    images_per_concept: int = 8
    mask_source: str = "auto"
    latents: dict | None = None  # a LATENT
    mask: torch.Tensor | None = None
    image_size: int = 0
    image_model: object = None  # a MODEL
    concept_file: str = ""
    resume_folder: str = ""
    settings: str = PER_TYPE
    batch: int = 0
    concept_list: object = None  # a mace_core.concepts.ConceptList
    sampling: attention.ImageSampling = attention.ImageSampling()  # the image_* inputs: how images are drawn


class MACETrainConceptLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACETrainConceptLoRA",
            display_name="MACE Train Concept LoRA",
            category="MACE",
            description="MACE stage 2: for each concept, trains a small LoRA on the cross-attention key/value "
                        "projections so that the concept's words (and the end/padding tokens that summarise the "
                        "prompt) stop being attended to where the concept appears in its images. Images are made "
                        "with the incoming model unless latents are given; masks come from the model's own "
                        "attention unless a mask is given. Connect the refined model from MACE Refine "
                        "Cross-Attention. The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to train on, usually the output of MACE Refine "
                                                "Cross-Attention; training starts from its current weights."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model."),
                *concept_inputs(),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=STEPS_MIN, max=STEPS_MAX,
                             tooltip=f"Training steps per concept (the paper: 50; 120 for explicit content). With "
                                     f"settings '{PER_TYPE}', left at {DEFAULT_STEPS} each concept takes its type's "
                                     "value; any other value is used for every concept."),
                # round=False: the widget's default rounding to its step would turn 1e-6 into 0
                io.Float.Input("learning_rate", default=DEFAULT_LEARNING_RATE, min=LEARNING_RATE_MIN,
                               max=LEARNING_RATE_MAX, step=1e-5, round=False,
                               tooltip="AdamW learning rate (the paper: 1e-4 for celebrities and styles, 1e-5 for "
                                       f"objects and explicit content). With settings '{PER_TYPE}', left at 1e-4 "
                                       "each concept takes its type's value; any other value is used for every "
                                       "concept."),
                io.Int.Input("rank", default=1, min=1, max=64,
                             tooltip="Rank of each concept's LoRA on every to_k/to_v matrix (the paper: 1)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the generated images, LoRA initialisation, and the image, prompt, "
                                     "timestep and noise of every step. The same seed gives the same LoRAs."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_KINDS), default=DEFAULT_TIMESTEPS,
                               tooltip="importance: timesteps mostly in 200..400 of 1000, where the layout is "
                                       "decided (the paper's choice, except for explicit content); uniform: any "
                                       f"timestep alike. With settings '{PER_TYPE}', left at {DEFAULT_TIMESTEPS} "
                                       "each concept takes its type's choice; uniform is used for every concept."),
                io.Int.Input("images_per_concept", default=8, min=1, max=256,
                             tooltip="How many training images to generate per concept when no latents are "
                                     "given. Ignored when latents are connected."),
                io.Combo.Input("mask_source", options=list(MASK_SOURCES), default="auto",
                               tooltip="Where the loss applies in each image. auto: the given mask if connected, "
                                       "else the whole image for styles and the model's own attention to the "
                                       "concept's words for other types. given: the connected mask. attention: "
                                       "derived from cross-attention. whole image: every pixel."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Training images as latents: a block of K images per concept, in the order "
                                        "the concepts are listed (K = batch size / number of concepts). Images "
                                        "made by the original model (before refinement) show the concept best."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where each latent image shows its concept (1 inside), in the latents' "
                                      "order; one mask per image, or one for all."),
                io.Int.Input("image_size", default=0, min=0, max=2048, step=64, optional=True,
                             tooltip="Side in pixels of the generated training images; 0 picks the model's usual "
                                     "size (SD1.x 512; SD2.x 768 for 768-v models, 512 for the base; SDXL 1024). "
                                     "Smaller is faster."),
                io.Model.Input("image_model", optional=True,
                               tooltip="The model that makes the training images and attention masks when no "
                                       "latents are connected; connect the original checkpoint (it still draws the "
                                       "concepts). Default: the model being trained."),
                concept_file_input(),
                io.String.Input("resume_folder", default="", optional=True,
                                tooltip="Optional: a folder under models/loras (e.g. 'mace/run1') that makes long runs "
                                        "resumable. Each concept's LoRA is written there as soon as it is trained; "
                                        "a concept whose file there was trained with exactly these settings (same "
                                        "model, position in the list, rank, steps, seed, learning rate, data) is "
                                        "loaded instead of trained again. Blank = off."),
                # last, with a default: saved workflows, which lack it, keep loading
                io.Combo.Input("settings", options=list(SETTINGS), default=PER_TYPE, optional=True,
                               tooltip=f"{PER_TYPE}: each concept trains with the paper's settings for its own type "
                                       f"({describe_presets()}), so a mixed list trains each concept its own way; "
                                       "steps, learning_rate or timestep_sampling changed from their defaults win "
                                       "over the preset. custom: steps, learning_rate and timestep_sampling as set, "
                                       "for every concept. The log lists what each concept used."),
                io.Int.Input("batch", default=0, min=0, max=1024, optional=True,
                             tooltip="How many concepts make their images and masks, and train, together (one "
                                     "forward and backward pass for all of them). 0 = automatic: as many as the "
                                     f"free memory holds, up to {AUTO_BATCH_MAX}. The LoRAs are the same whatever "
                                     "the batch; a batch that does not fit is lowered, and the log says so."),
                concept_list_input(),
                # new inputs go last: saved workflows keep their widget order and their links
                *image_sampling_inputs("Ignored when latents are connected."),
            ],
            outputs=[
                MaceLoras.Output("loras", display_name="loras",
                                 tooltip="One LoRA per concept (for MACE fusion or saving)."),
                io.Model.Output("model_out", display_name="model",
                                tooltip="Preview: the input model with every concept's LoRA simply added. Fuse "
                                        "the LoRAs for many concepts instead of using this."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="Training loss per step for every concept."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", **kwargs):
        return concept_file_fingerprint(concept_file)

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, steps, learning_rate, rank, seed,
                timestep_sampling, images_per_concept, mask_source, latents=None, mask=None, image_size=0,
                image_model=None, concept_file="", resume_folder="", settings=PER_TYPE, batch=0, concept_list=None,
                image_steps=None, image_cfg=None, image_sampler=None, image_scheduler=None):
        # an API graph may send None for an optional input: that input's default then
        req = TrainRequest(concepts=concepts, concept_type=concept_type, anchor=anchor, steps=steps,
                           learning_rate=learning_rate, rank=rank, seed=seed, timestep_sampling=timestep_sampling,
                           images_per_concept=images_per_concept, mask_source=mask_source, latents=latents,
                           mask=mask, image_size=image_size or 0, image_model=image_model,
                           concept_file=concept_file or "", resume_folder=resume_folder or "",
                           settings=settings or PER_TYPE, batch=batch or 0, concept_list=concept_list,
                           sampling=image_sampling(image_steps, image_cfg, image_sampler, image_scheduler))
        bundle, model_out, curves = train_loras(model, clip, req)
        return io.NodeOutput(bundle, model_out, render_loss_curve(curves))


@dataclass
class _ConceptData:
    prompts: list
    latents: torch.Tensor  # LATENT samples (K, c, H, W)
    masks: torch.Tensor  # (K, h, w) in [0, 1], any resolution with the latents' aspect
    mask_source: str


def mask_mode(source: str, concept_type: str, has_mask: bool) -> str:
    """auto: the connected mask, else where the paper's preset for the type trains (every pixel for styles, the
    concept's region, from attention, for the others)."""
    if source == "auto":
        return "given" if has_mask else PRESETS[concept_type].mask_source
    return source


def _check_inputs(items, req: TrainRequest, model):
    """The request's settings checked; returns the latents' samples and the mask as training reads them (None when
    not connected)."""
    check_steps(req.steps)
    check_learning_rate(req.learning_rate)
    check_settings(req.settings)
    if req.rank < 1:
        raise MaceInputError("rank", f"must be at least 1, got {req.rank}.")
    if req.timestep_sampling not in TIMESTEP_KINDS:
        raise MaceInputError("timestep_sampling", f"unknown value '{req.timestep_sampling}'.",
                             f"Use one of: {', '.join(TIMESTEP_KINDS)}.")
    if req.mask_source not in MASK_SOURCES:
        raise MaceInputError("mask_source", f"unknown value '{req.mask_source}'.",
                             f"Use one of: {', '.join(MASK_SOURCES)}.")
    samples, mask = None, req.mask
    if req.latents is not None:
        samples = latent_samples(req.latents, model)
        if samples.shape[0] % len(items):
            raise MaceInputError("latents", f"hold {samples.shape[0]} images, not a multiple of the {len(items)} "
                                            "concepts.", "Give the same number of images for every concept, in the "
                                                         "order the concepts are listed.")
    elif req.images_per_concept < 1:
        raise MaceInputError("images_per_concept", f"must be at least 1, got {req.images_per_concept}.")
    if samples is None:
        check_image_sampling(req.sampling)
    if req.image_size and req.image_size < 64:
        raise MaceInputError("image_size", f"must be 0 (automatic) or at least 64, got {req.image_size}.")
    if mask is not None:
        if samples is None:
            raise MaceInputError("mask", "a mask needs the latents it was made for.",
                                 "Connect the latents too, or disconnect the mask.")
        mask = check_mask(mask, samples.shape[0], tuple(samples.shape[-2:]))
    if req.mask_source == "given" and mask is None:
        raise MaceInputError("mask", "mask_source is 'given' but no mask is connected.",
                             "Connect a mask, or choose another mask_source.")
    return samples, mask


def _prepare_data(model, clip, items, enc, samples, mask, req: TrainRequest, progress,
                  only=None) -> list[_ConceptData | None]:
    # Images and attention masks of the concept come from the model that still draws it (MACE makes its data with
    # the original model, then trains on the refined one).
    source = req.image_model if req.image_model is not None else model
    seed = req.seed
    k = samples.shape[0] // len(items) if samples is not None else req.images_per_concept
    size = req.image_size or attention.default_image_size(model)
    todo = [i for i in range(len(items)) if only is None or i in only]  # the others resumed from their files
    out: list[_ConceptData | None] = [None] * len(items)
    modes = [mask_mode(req.mask_source, c.concept_type, mask is not None) for c in items]
    if mask is not None and todo and any(m != "given" for m in modes):
        log.info("MACE train: mask_source '%s' ignores the connected mask", req.mask_source)

    def prepare(chunk: list[int]):
        # one sampler run for the chunk's images and one batch of forwards for its attention masks: concept i's data
        # depend only on (seed, i), whatever the chunk (attention.generate_latents_batch, derive_masks_batch)
        n = len(chunk)
        if samples is not None:
            lats = {i: samples[i * k:(i + 1) * k] for i in chunk}
        else:
            texts = [attention.data_template(items[i]).format(items[i].name) for i in chunk]
            made = attention.generate_latents_batch(source, clip, texts, k, size, [seed + i for i in chunk],
                                                    on_step=progress, sampling=req.sampling)
            lats = dict(zip(chunk, made))
        masks = {}
        for i in chunk:
            if modes[i] == "given":
                masks[i] = mask[i * k:(i + 1) * k]
            elif modes[i] == "whole image":
                masks[i] = torch.ones((k,) + tuple(lats[i].shape[-2:]))
        derived = [i for i in chunk if i not in masks]
        if derived:
            prompts = [attention.concept_prompts(clip, items[i], [attention.data_template(items[i])], enc.end_id)[0]
                       for i in derived]
            masks.update(zip(derived, attention.derive_masks_batch(source, prompts, [lats[i] for i in derived],
                                                                   [seed + i for i in derived])))
        for i in chunk:
            c = items[i]
            log.info("MACE train: '%s': %d images, mask %s (%.0f%% of pixels)", c.name, k, modes[i],
                     100 * float(masks[i].float().mean()))
            # the concept's own prompts and nicknames join its type's templates (MACE Concept List)
            prompts = [p for v in c.variants() for p in attention.concept_prompts(clip, v, v.templates(), enc.end_id)]
            out[i] = _ConceptData(prompts, lats[i], masks[i], modes[i])
        progress(n)  # the masks (or the given data) done

    if todo:
        size_now = req.batch or _data_batch(source, k, size, len(todo))
        _in_batches([todo], size_now, prepare, "training images and masks", explicit=bool(req.batch),
                    progress=progress)
    return out


# ---------------------------------------------------------------- batches of concepts

# The automatic batch's cap: on the tiny CPU model 16 -> 64 concepts cut the per-concept time only 15 % more
# (bench_train_batch.py), while memory grows with every concept; GPU figures: bench/gpu_run.sh.
AUTO_BATCH_MAX = 64
MEMORY_SHARE = 0.7  # of the free memory a batch may plan to use: allocator slack, fragmentation, the estimate's error


def _check_batch(batch):
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch <= 1024:
        raise MaceInputError("batch", f"must be 0 (automatic) or a number of concepts from 1 to 1024, got {batch!r}.")


_ONE_DOES_NOT_FIT = ("MACE train: out of memory with one concept at a time ({what}); lower image_size or "
                     "images_per_concept, or free memory (close other models).")


def _oom(e: BaseException) -> bool:
    """An allocation failure a smaller batch may avoid: CUDA's OutOfMemoryError, or the CPU allocator's."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def _in_batches(groups: list[list[int]], size: int, run, what: str, explicit: bool, progress: host.Progress):
    """run(chunk) over consecutive chunks of at most `size` concepts of each group. An allocation failure retries the
    failed chunk and everything after it at half the size (announced in the log): concept i's result depends only
    on (seed, i), never on its chunk, and the chunks already done are kept (and, with a resume folder, saved). The
    failed chunk's progress is rewound, so the retried steps are not counted twice."""
    for group in groups:
        pos = 0
        while pos < len(group):
            chunk = group[pos:pos + size]
            mark = progress.done
            try:
                run(chunk)
            except Exception as e:
                progress.rewind(mark)
                if not _oom(e) or len(chunk) == 1:
                    if _oom(e):
                        raise RuntimeError(_ONE_DOES_NOT_FIT.format(what=what)) from e
                    raise
                size = max(1, len(chunk) // 2)
                log.warning("MACE train: %d concepts at a time did not fit in memory (%s)%s; going on with %d at a "
                            "time", len(chunk), what, " at the batch input's size" if explicit else "", size)
                host.release_cached_memory()
                continue
            pos += len(chunk)


def _free_memory(patcher, loaded: bool) -> float:
    return host.free_memory(patcher, loaded)


def _data_batch(source, images: int, size: int, count: int) -> int:
    """Concepts per sampler run for the training images: ComfyUI's own estimate of what one denoiser call on a
    concept's images takes (the batch of `images` with CFG's unconditional half) against the free memory."""
    ratio = getattr(source.model.latent_format, "spacial_downscale_ratio", 8)
    shape = [2 * images, source.model.latent_format.latent_channels, size // ratio, size // ratio]
    need = max(1.0, host.inference_memory(source, shape))
    fit = int(MEMORY_SHARE * _free_memory(source, False) // need)
    return max(1, min(AUTO_BATCH_MAX, count, fit))


def _training_batch(tm, data: _ConceptData, up: dict, down: dict, asked: int, count: int) -> int:
    """Concepts per training step, from what one and two concepts' forwards keep for backward (their saved tensors'
    bytes, counted once per storage): the difference is what each concept of a batch adds, the rest is shared (the
    few weight copies that cannot be remade in backward, see frozen_weights.py). Backward holds about as much
    again in activation gradients while it runs. A `batch` input larger than fits is lowered, and the log says so."""

    def saved_bytes(k: int) -> int:
        d = attention.ConceptData(data.prompts, data.latents, data.masks, "uniform")
        task = attention.BatchTask(tm, [d] * k,
                                   {n: torch.stack([v.detach()] * k).requires_grad_(True) for n, v in up.items()},
                                   {n: torch.stack([v.detach()] * k).requires_grad_(True) for n, v in down.items()})
        try:
            task.losses(0, [torch.Generator().manual_seed(0) for _ in range(k)])
        except Exception as e:
            if _oom(e):
                raise RuntimeError(_ONE_DOES_NOT_FIT.format(what="training")) from e
            raise
        return tm.copies.kept_bytes  # what the forward kept for backward (frozen weights' copies are remade there)

    one = saved_bytes(1)
    per_concept = max(1.0, 2.0 * (saved_bytes(2) - one)) if count > 1 or asked > 1 else 2.0 * one
    shared = max(0.0, one - per_concept / 2)
    free = _free_memory(tm.patcher, True)
    fit = max(1, int((MEMORY_SHARE * free - shared) // per_concept))
    if asked and asked > fit:
        log.warning("MACE train: batch %d does not fit in free memory (about %.0f MiB per concept, %.0f MiB free): "
                    "training %d at a time", asked, per_concept / 2**20, free / 2**20, fit)
    chosen = min(asked, fit) if asked else min(AUTO_BATCH_MAX, fit)
    log.info("MACE train: about %.0f MiB per concept in a training batch, %.0f MiB free", per_concept / 2**20,
             free / 2**20)
    return max(1, min(chosen, count))


def _data_units(samples, req: TrainRequest) -> int:
    """Progress units of one concept's data: each sampler step of its generated images, then its masks."""
    return 1 if samples is not None else req.sampling.steps + 1


def train_concept_loras(model, clip, concepts, concept_type, anchor="", steps=DEFAULT_STEPS,
                        learning_rate=DEFAULT_LEARNING_RATE, rank=1, seed=0, timestep_sampling=DEFAULT_TIMESTEPS,
                        images_per_concept=8, mask_source="auto", latents=None, mask=None, image_size=0,
                        image_model=None, concept_file="", resume_folder="", settings=PER_TYPE, batch=0,
                        concept_list=None, image_steps=None, image_cfg=None, image_sampler=None,
                        image_scheduler=None):
    """The Train node with its inputs one by one, as tests and benches call it: they become a TrainRequest for
    train_loras."""
    return train_loras(model, clip, TrainRequest(
        concepts=concepts, concept_type=concept_type, anchor=anchor, steps=steps, learning_rate=learning_rate,
        rank=rank, seed=seed, timestep_sampling=timestep_sampling, images_per_concept=images_per_concept,
        mask_source=mask_source, latents=latents, mask=mask, image_size=image_size, image_model=image_model,
        concept_file=concept_file, resume_folder=resume_folder, settings=settings, batch=batch,
        concept_list=concept_list, sampling=image_sampling(image_steps, image_cfg, image_sampler, image_scheduler)))


def train_loras(model, clip, req: TrainRequest):
    """Validate everything, make or take the data, train one LoRA per concept on a private clone, then build the
    bundle and the preview model. Returns (LoRABundle, MODEL, {concept: losses}). Each concept trains with the
    steps, learning rate and timestep sampling that `req.settings` gives its type (mace_core.train.concept_settings).
    Nothing is applied to the model on failure or cancel; with a resume_folder, each concept's LoRA is written there
    as soon as it is trained, and concepts already there (same settings) are loaded instead of trained. A connected
    concept_list supplies the concepts (with own prompts and nicknames, which join each concept's prompts)."""
    items = list(stage_list(req.concept_list, "MACE Train", req.concepts, req.concept_type, req.anchor,
                            req.concept_file).concepts)
    samples, mask = _check_inputs(items, req, model)
    _check_batch(req.batch)
    keys = host.cross_attention_keys(model, clip)
    enc = host.clip_encoder(clip)
    check_concepts(items, enc)
    per = [concept_settings(c.concept_type, req.settings, req.steps, req.learning_rate, req.timestep_sampling)
           for c in items]
    cfgs = [TrainConfig(steps=p.steps, learning_rate=p.learning_rate, seed=req.seed) for p in per]
    for c, p in zip(items, per):
        log.info("MACE train: '%s' (%s): %s", c.name, c.concept_type, p.describe())
    units = _data_units(samples, req)
    progress = host.Progress(sum(cfg.steps + units for cfg in cfgs))
    t0 = time.perf_counter()
    if req.image_model is not None:
        host.cross_attention_keys(req.image_model, clip)
    shapes = {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}
    base = host.model_fingerprint(model)
    loras: list[ConceptLoRA | None] = [None] * len(items)
    resume = None
    if (req.resume_folder or "").strip():
        resume = _Resume(req, items, model, keys, shapes, base, cfgs, per, samples, mask)
        for i in range(len(items)):
            loras[i] = resume.load(i)
            if loras[i] is not None:
                progress(cfgs[i].steps + units)
    todo = [i for i in range(len(items)) if loras[i] is None]
    data = _prepare_data(model, clip, items, enc, samples, mask, req, progress, only=set(todo))
    t_data = time.perf_counter() - t0

    # the executor runs nodes under inference_mode; training needs autograd on a private clone
    with torch.inference_mode(False), torch.enable_grad():
        tm = attention.TrainableModel(model, keys) if todo else None
        try:
            if tm is not None:
                tm.load()
                _train_batches(tm, todo, items, data, per, cfgs, shapes, req, loras, resume, progress)
        finally:
            if tm is not None:
                with torch.inference_mode():  # unload as the executor would: weights go back as inference tensors
                    tm.release()
    if resume is not None:
        log.info("MACE train: %d of %d concepts loaded from %s, %d trained", len(items) - len(todo), len(items),
                 resume.folder, len(todo))
    bundle = LoRABundle(loras, base=base, meta={"stage": "train"})
    model_out = host.with_deltas(model, WeightDeltas({k: bundle.summed_delta(k) for k in keys}))
    t_all = time.perf_counter() - t0
    log.info("MACE train: %d concepts, %d steps in all, in %.1fs (data %.1fs, %.2fs per concept of training)",
             len(items), sum(cfg.steps for cfg in cfgs), t_all, t_data, (t_all - t_data) / max(1, len(todo)))
    return bundle, model_out, {lora.concept: lora.meta["losses"] for lora in loras}


def _train_batches(tm, todo, items, data, per, cfgs, shapes, req: TrainRequest, loras, resume, progress):
    """The concepts not resumed, K at a time: concepts whose steps and optimiser settings agree share a batch (one
    stacked AdamW is then K exact per-concept AdamWs); each concept starts from the LoRA and generator it would have
    alone (mace_core.train.concept_generator(seed, i)), so a batch gives the LoRAs single runs give. Each concept's
    LoRA is stored, and with a resume folder saved, as soon as its batch is done."""
    groups: list[list[int]] = []
    for i in todo:
        for g in groups:
            if same_optimiser(cfgs[g[0]], cfgs[i]):
                g.append(i)
                break
        else:
            groups.append([i])

    seed = req.seed

    def start(i):
        gen = concept_generator(seed, i)
        up, down = init_lora(shapes, req.rank, gen, device=tm.device)
        return gen, up, down

    _, up0, down0 = start(todo[0])
    size = _training_batch(tm, data[todo[0]], up0, down0, req.batch, max(len(g) for g in groups))
    if len(todo) > 1:
        log.info("MACE train: %d concepts, %d at a time%s", len(todo), size,
                 f", in {len(groups)} groups of the same steps and learning rate" if len(groups) > 1 else "")

    def run(chunk):
        starts = [start(i) for i in chunk]
        up = {k: torch.stack([s[1][k].detach() for s in starts]).requires_grad_(True) for k in shapes}
        down = {k: torch.stack([s[2][k].detach() for s in starts]).requires_grad_(True) for k in shapes}
        task = attention.BatchTask(tm, [attention.ConceptData(data[i].prompts, data[i].latents, data[i].masks,
                                                              per[i].timestep_sampling) for i in chunk], up, down)
        curves = train_batch(task, cfgs[chunk[0]], [s[0] for s in starts], progress, [items[i].name for i in chunk])
        for b, i in enumerate(chunk):
            c, d, p = items[i], data[i], per[i]
            u = {k: v[b].detach().float().cpu() for k, v in up.items()}
            dn = {k: v[b].detach().float().cpu() for k, v in down.items()}
            loras[i] = ConceptLoRA(c.name, c.anchor, c.concept_type, next(iter(dn.values())).shape[0], p.steps, u, dn,
                                   meta={"losses": curves[b], "learning_rate": p.learning_rate, "seed": seed,
                                         "timestep_sampling": p.timestep_sampling, "settings": req.settings,
                                         "source": p.source, "mask_source": d.mask_source,
                                         "images": int(d.latents.shape[0])})
            if resume is not None:
                resume.save(i, loras[i])

    _in_batches(groups, size, run, "training", explicit=bool(req.batch), progress=progress)


# ---------------------------------------------------------------- resumable runs

# 2: the paper's LoRA start (normal down matrix) and settings per concept. 3: training images made as the paper made
# them (30 dpmpp_2m steps at 7.5, no longer 20 euler steps at 7) and the image settings in the key. Older files
# train again.
RESUME_VERSION = 3


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


class _Resume:
    """One file per concept in models/loras/<folder>, written as soon as the concept is trained. A file is reused only
    when its recorded key matches: the key covers everything the LoRA depends on (base and starting weights, the
    concept's position in the list, which seeds its generator and data, rank, and the concept's own steps, seed,
    optimiser settings, timestep sampling, mask mode and its data), so a resumed run gives the LoRAs an uninterrupted
    run gives."""

    def __init__(self, req: TrainRequest, items, model, keys, shapes, base, cfgs, per, samples, mask):
        self.folder = inside(loras_root(), req.resume_folder.strip(), "resume_folder")
        self.items, self.shapes, self.base = items, shapes, base
        start = host.current_weights(model, keys)
        run = {"v": RESUME_VERSION, "base": base, "start": _digest(start[k] for k in keys), "rank": req.rank}
        self.cfgs, self.per = cfgs, per
        if samples is None:
            image_model = req.image_model
            source = image_model if image_model is not None else model
            run["data"] = {"images": req.images_per_concept,
                           "size": req.image_size or attention.default_image_size(model),
                           "source": _digest(host.current_weights(source, keys).values()) if image_model else "model",
                           "sampling": repr(req.sampling)}
        self.run, self.samples, self.mask, self.mask_source = run, samples, mask, req.mask_source
        self.k = samples.shape[0] // len(items) if samples is not None else req.images_per_concept
        slugs = [slug(c.name) for c in items]
        self.names = [s if slugs.count(s) == 1 else f"{s}-{hashlib.sha1(c.name.lower().encode()).hexdigest()[:6]}"
                      for s, c in zip(slugs, items)]
        mine = {n + ".safetensors" for n in self.names}
        if os.path.isdir(self.folder):
            other = [f for f in os.listdir(self.folder) if f.endswith(".safetensors") and f not in mine]
            if other:
                log.info("MACE train: %s also holds %d files of other concepts (left alone), e.g. %s", self.folder,
                         len(other), other[0])

    def path(self, i: int) -> str:
        return os.path.join(self.folder, self.names[i] + ".safetensors")

    def key(self, i: int) -> str:
        c = self.items[i]
        mode = mask_mode(self.mask_source, c.concept_type, self.mask is not None)
        # "family": the name the key had before the idea was called concept_type; renaming it would change every
        # key, and resume folders already written would train again
        own = {"index": i, "concept": c.name, "anchor": c.anchor, "family": c.concept_type, "mask": mode,
               "templates": c.templates() + [attention.data_template(c)], "cfg": repr(self.cfgs[i]),
               **({"aliases": list(c.aliases)} if c.aliases else {}),
               "timestep_sampling": self.per[i].timestep_sampling}
        if self.samples is not None:
            part = slice(i * self.k, (i + 1) * self.k)
            own["latents"] = _digest([self.samples[part]])
            if mode == "given":
                own["given_mask"] = _digest([self.mask[part]])
        text = json.dumps({"run": self.run, "concept": own}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, i: int) -> ConceptLoRA | None:
        path = self.path(i)
        if not os.path.isfile(path):
            return None
        name = os.path.relpath(path, loras_root())
        try:
            lora, _ = lora_files.load_lora(path, self.shapes, input_name="resume_folder")
        except MaceInputError as e:
            log.warning("MACE train: %s is unreadable (%s); training '%s' again", name, e, self.items[i].name)
            return None
        if lora.meta.get("resume_key") != self.key(i) or lora.concept != self.items[i].name:
            log.info("MACE train: %s was trained with other settings; training '%s' again (the file is replaced)",
                     name, self.items[i].name)
            return None
        lora.anchor, lora.concept_type = self.items[i].anchor, self.items[i].concept_type
        log.info("MACE train: '%s' loaded from %s", lora.concept, name)
        return lora

    def save(self, i: int, lora: ConceptLoRA):
        lora.meta["resume_key"] = self.key(i)
        lora_files.save_lora(self.path(i), lora, self.base)


# ---------------------------------------------------------------- loss plot

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def render_loss_curve(curves: dict[str, list[float]], width: int = 640, height: int = 360) -> torch.Tensor:
    """Loss per step per concept as an IMAGE (1, H, W, 3) in [0, 1]; each curve is drawn relative to the shared
    y range, the legend names the concepts with their first and last loss."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, width - 12, 14, height - 36
    values = [v for c in curves.values() for v in c]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo = min(lo, 0.0)
    hi = hi if hi > lo else lo + 1.0
    n = max((len(c) for c in curves.values()), default=1)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for f in (0.0, 0.5, 1.0):
        y = bottom - f * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{lo + f * (hi - lo):.3g}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 6), "1", fill=(0, 0, 0), font=font)
    draw.text((right - 24, bottom + 6), str(n), fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 40, bottom + 18), "step (loss per concept)", fill=(0, 0, 0), font=font)

    def xy(i, v):
        x = left + (i / max(1, n - 1)) * (right - left)
        return x, bottom - (v - lo) / (hi - lo) * (bottom - top)

    for ci, (name, losses) in enumerate(curves.items()):
        color = _COLORS[ci % len(_COLORS)]
        pts = [xy(i, v) for i, v in enumerate(losses)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        if ci < 12 and losses:
            label = f"{name[:28]}: {losses[0]:.3g} -> {losses[-1]:.3g}"
            draw.text((right - 230, top + 4 + 12 * ci), label, fill=color, font=font)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


NODES = [MACETrainConceptLoRA]
