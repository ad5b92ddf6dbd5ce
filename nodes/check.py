"""MACE Erasure Check: the same seeds on the original and the erased model, as one labelled grid."""

import logging
import time
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..mace_core.concepts import Concept, parse_preserve
from ..mace_core.errors import MaceInputError
from . import attention, host, inputs, picture, sampling
from .fuse import erased_concepts
from .inputs import concept_list_input, stage_list

log = logging.getLogger("MACE")

MAX_PER_PROMPT = 16


@dataclass
class Row:
    kind: str  # "erased", "other" (synonyms or the user's prompts) or "preserved"
    prompt: str
    literal: bool  # tokenized without ComfyUI's weight syntax (prompts made from names)

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.prompt}"


class MACEErasureCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEErasureCheck",
            display_name="MACE Erasure Check",
            category="MACE",
            description="Samples the erased concepts, other prompts (their synonyms, or your own) and the concepts to "
                        "preserve with the same seeds on the original and on the erased model, and lays the pictures "
                        "out as one labelled grid: a row per prompt, the original's pictures on the left and the "
                        "erased model's on the right, a column per seed. Erased rows should change, preserved rows "
                        "should not.",
            inputs=[
                io.Model.Input("model", tooltip="The original model, before erasure."),
                io.Model.Input("erased_model", tooltip="The erased model (MACE Erase, or Refine/Fuse)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with the model (MACE leaves it unchanged)."),
                io.Vae.Input("vae", tooltip="The VAE loaded with the model, to decode the pictures."),
                *inputs.concept_inputs(),
                io.String.Input("other_prompts", multiline=True, default="",
                                tooltip="Further rows, one prompt per line: other names of the erased concepts "
                                        "(synonyms, nicknames), or any prompt of your own. Written as for a text "
                                        "encode node (weights allowed)."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts that should stay, one per line, optionally typed ('name | style'), "
                                        "as in the erasure's preserve box: each gets a row."),
                # stated, not left to the frontend: it adds a control widget to any 'seed' anyway, and the workflow
                # generator must know it is there (else saved widget values shift by one after the seed)
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="First seed; the columns use seed, seed + 1, ... on both models alike."),
                io.Int.Input("images_per_prompt", default=2, min=1, max=MAX_PER_PROMPT,
                             tooltip="Seeds (columns) per model."),
                *sampling.sampler_inputs(),
                io.String.Input("negative", default="", tooltip="Negative prompt of every picture."),
                inputs.concept_file_input(),
                concept_list_input(),
            ],
            outputs=[io.Image.Output(tooltip="The labelled grid: rows are prompts, columns 'before' and 'after' per "
                                             "seed.")],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", **kwargs):
        return inputs.concept_file_fingerprint(concept_file)

    @classmethod
    def execute(cls, model, erased_model, clip, vae, concepts, concept_type, anchor, other_prompts, preserve, seed,
                images_per_prompt, steps, cfg, sampler_name, scheduler, image_size, negative, concept_file="",
                concept_list=None):
        result = erasure_check(model, erased_model, clip, vae, concepts, concept_type, anchor, other_prompts,
                               preserve, seed, images_per_prompt, steps, cfg, sampler_name, scheduler, image_size,
                               negative, concept_file or "", concept_list)
        return io.NodeOutput(result.image)


@dataclass
class CheckResult:
    image: torch.Tensor  # IMAGE (1, H, W, 3)
    layout: picture.GridLayout
    cells: torch.Tensor  # (rows, cols, h, w, 3): the pictures as sampled, before enlargement
    rows: list[Row]
    col_labels: list[str]
    seeds: list[int]


def erased_list(erased_model, concepts, concept_type, anchor, concept_file) -> list[Concept]:
    """The box's (and file's) concepts; a blank box means the concepts the erased model records (MACE Erase and Fuse
    note what they erased), so the list need not be typed twice."""
    if (concepts or "").strip() or (concept_file or "").strip() or concept_type == "explicit":
        return inputs.read_concepts(concepts, concept_type, anchor, concept_file)
    recorded = erased_concepts(erased_model)
    if not recorded:
        raise MaceInputError("concepts", "no concepts given, and the erased model records none.",
                             "Write the erased concepts, one per line.")
    return [Concept(r["concept"], r.get("anchor", ""), r.get("concept_type") or concept_type) for r in recorded]


def check_rows(items: list[Concept], other_prompts: str, preserve, concept_type: str) -> list[Row]:
    """preserve: the box's text, or the Preserved list of a concept list. A concept's nicknames get 'other' rows: they
    were erased with it, so they should change too."""
    rows = [Row("erased", attention.data_template(c).format(c.name), True) for c in items]
    rows += [Row("other", attention.data_template(c).format(a), True) for c in items for a in c.aliases]
    rows += [Row("other", " ".join(line.split()), False) for line in (other_prompts or "").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    for k in (parse_preserve(preserve) if isinstance(preserve, str) or preserve is None else preserve):
        ctype = k.concept_type or (items[0].concept_type if items else concept_type)
        rows.append(Row("preserved", attention.data_template(Concept(k.name, "", ctype)).format(k.name), True))
    return rows


def erasure_check(model, erased_model, clip, vae, concepts, concept_type="celebrity", anchor="", other_prompts="",
                  preserve="", seed=0, images_per_prompt=2, steps=20, cfg=sampling.DEFAULT_CFG, sampler_name="euler",
                  scheduler="normal", image_size=0, negative="", concept_file="", concept_list=None) -> CheckResult:
    """Sample every row on both models with the same seeds and lay it out. Nothing is patched: both models are only
    sampled (ComfyUI loads and unloads their clones as KSampler would)."""
    if not 1 <= images_per_prompt <= MAX_PER_PROMPT:
        raise MaceInputError("images_per_prompt", f"must be 1 to {MAX_PER_PROMPT}, got {images_per_prompt}.")
    if concept_list is not None:  # the list's concepts and preserved concepts are the rows; the boxes must not disagree
        cl = stage_list(concept_list, "MACE Erasure Check", concepts, concept_type, anchor, concept_file, preserve)
        items, preserve, concept_type = list(cl.concepts), list(cl.preserve), cl.concept_type
    else:
        items = erased_list(erased_model, concepts, concept_type, anchor, concept_file)
    host.cross_attention_keys(model, clip)
    host.cross_attention_keys(erased_model, clip)
    rows = check_rows(items, other_prompts, preserve, concept_type)
    size = sampling.picture_size(model, image_size)
    seeds = [int(seed) + i for i in range(images_per_prompt)]
    progress = host.Progress(len(rows) * 2 * steps)
    sampler = sampling.Sampler(clip, steps, cfg, sampler_name, scheduler, size, negative, on_step=progress)
    t0 = time.perf_counter()
    cells = []
    for row in rows:
        pics = [sampling.decode(vae, sampler.latents(m, row.prompt, seeds, row.literal)) for m in (model, erased_model)]
        cells.append(torch.cat(pics))
    cells = torch.stack(cells)
    col_labels = [f"{which}, seed {s}" for which in ("before", "after") for s in seeds]
    image, layout = picture.grid(cells, [r.label for r in rows], col_labels, group=len(seeds))
    log.info("MACE check: %d rows x %d pictures per model at %d px, cfg %g, in %.1fs", len(rows), len(seeds), size,
             cfg, time.perf_counter() - t0)
    return CheckResult(image, layout, cells, rows, col_labels, seeds)


NODES = [MACEErasureCheck]
