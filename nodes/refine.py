"""MACE Refine Cross-Attention: stage 1 as a node."""

import logging
import time

from comfy_api.latest import io

from ..mace_core.prior import generic_prompts, prior_moment, prompt_set_version
from ..mace_core.refine import refine
from . import host
from .inputs import (
    concept_file_fingerprint,
    concept_file_input,
    concept_inputs,
    concept_list_input,
    preserve_inputs,
    stage_list,
)
from .pooled import EDIT_POOLED_DEFAULT, edit_pooled_input, pooled_deltas

log = logging.getLogger("MACE")


def prior_for(clip, enc, progress=None, corpus=()):
    """Generic-prompt statistics of this text encoder, computed once and cached on disk. A caption corpus (a concept
    list's corpus_file) joins the built-in prompts; the key holds a digest of the whole prompt set, so an edited
    corpus is a new key and never reuses the old statistics."""
    prompts = generic_prompts() + list(corpus) if corpus else None
    # keyed by the features (layer setting included) and by the generic prompt set they are computed from
    name = f"prior_{host.text_features_key(clip)}_{prompt_set_version(prompts)}"
    if corpus:
        log.info("MACE: preservation prior over %d built-in prompts and %d corpus captions", len(generic_prompts()),
                 len(corpus))
    # a corpus can hold 100k captions (minutes to encode): without a bar of its own, each batch still checks for
    # cancel, and a cancelled prior is never cached
    return host.cached_tensor(name, lambda: prior_moment(enc, prompts, progress=progress or host.check_cancel))


def progress_units(concepts: int, preserved: int) -> int:
    """Refine's progress units: the prior, each concept, each preserved concept (MACE Erase's bar reads it too)."""
    return 1 + concepts + preserved


class MACERefineCrossAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACERefineCrossAttention",
            display_name="MACE Refine Cross-Attention",
            category="MACE",
            description="Closed-form refinement of every cross-attention key/value projection (MACE stage 1): the "
                        "concepts' words, and what neighbouring words and padding carry of them, are mapped onto the "
                        "anchor, while generic prompts and the concepts to preserve stay as they were. Returns a "
                        "patched copy of the model; the input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to edit (SD1.x, SD2.x or SDXL UNet)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model; its features are the context "
                                              "the cross-attention reads."),
                *concept_inputs(),
                *preserve_inputs("the original", "edit"),
                concept_file_input(),
                edit_pooled_input(),
                concept_list_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with refined cross-attention, ready for KSampler.")],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", **kwargs):
        return concept_file_fingerprint(concept_file)

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, preserve, preservation_strength, lambda_,
                concept_file="", edit_pooled=EDIT_POOLED_DEFAULT, concept_list=None):
        model_out = refine_model(model, clip, concepts, concept_type, anchor, preserve, preservation_strength, lambda_,
                                 concept_file, edit_pooled, concept_list)
        return io.NodeOutput(model_out)


def refine_model(model, clip, concepts, concept_type, anchor="", preserve="", preservation_strength=1.0,
                 lambda_=0.01, concept_file="", edit_pooled=EDIT_POOLED_DEFAULT, concept_list=None):
    """Parse, validate, solve, then patch a clone. Nothing is applied until every step has succeeded. A connected
    concept_list supplies the concepts, preserve and corpus (inputs.stage_list)."""
    cl = stage_list(concept_list, "MACE Refine", concepts, concept_type, anchor, concept_file, preserve)
    items, preserved = list(cl.concepts), list(cl.preserve)
    keys = host.cross_attention_keys(model, clip)
    enc = host.clip_encoder(clip)
    progress = host.Progress(progress_units(len(items), len(preserved)))
    t0 = time.perf_counter()
    prior = prior_for(clip, enc, corpus=cl.corpus) if preservation_strength > 0 else None
    progress()
    # read one matrix at a time and made straight in the patch dtype (SDXL's K/V in float32 are 1.3 GB)
    current = host.CurrentWeights(model, keys, host.compute_device())
    dtype = host.patch_dtype(host.original_weights(model, keys[:1])[keys[0]].dtype)
    deltas = refine(items, enc, current, prior, preserved, prior_weight=preservation_strength,
                    preserve_weight=preservation_strength, lam=lambda_, progress=progress, out_dtype=dtype)
    if edit_pooled:
        deltas = deltas | pooled_deltas(model, clip, items, preserved, preservation_strength, lambda_)
    out = host.with_deltas(model, deltas)
    log.info("MACE refine: %d concepts, %d matrices in %.2fs", len(items), len(keys), time.perf_counter() - t0)
    return out


NODES = [MACERefineCrossAttention]
