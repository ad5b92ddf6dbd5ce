"""MACE Fuse LoRAs: stage 3 as a node."""

import logging
import time

from comfy_api.latest import io

from ..mace_core.errors import MaceInputError
from ..mace_core.fuse import fuse
from . import host
from .inputs import MaceLoras, concept_list_input, preserve_inputs, stage_list
from .loras import check_base
from .refine import prior_for

log = logging.getLogger("MACE")

# model_options entry listing what a patched clone erases, so MACE Save Erasure can record it in the file.
ERASED = "mace_erased"


def erased_concepts(model) -> list[dict]:
    return list(getattr(model, "model_options", {}).get(ERASED, []))


def record_erased(model, loras):
    """Appends the bundle's concepts to the clone's record (clone() deep-copies model_options: the input keeps its)."""
    have = {e["concept"].lower() for e in erased_concepts(model)}
    new = [{"concept": lora.concept, "anchor": lora.anchor, "concept_type": lora.concept_type}
           for lora in loras if lora.concept.lower() not in have]
    model.model_options[ERASED] = erased_concepts(model) + new


# The Fuse node's choice -> mace_core.fuse's preservation_target.
PRESERVATION_TARGETS = {"input model": "input", "original model": "original"}


class MACEFuseLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEFuseLoRAs",
            display_name="MACE Fuse LoRAs",
            category="MACE",
            description="Closed-form fusion of many per-concept LoRAs into the cross-attention key/value weights "
                        "(MACE stage 3): on every concept's prompts the result reproduces that concept's LoRA, while "
                        "generic prompts and the concepts to preserve stay near the original model. Unlike stacking "
                        "LoRAs, the concepts do not interfere. Returns a patched copy of the model; the input is not "
                        "changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRAs were trained on: usually the output of MACE "
                                                "Refine Cross-Attention."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model; each concept's prompts are "
                                              "encoded with it."),
                MaceLoras.Input("loras", tooltip="Per-concept LoRAs, from MACE Train or MACE Load LoRAs."),
                *preserve_inputs("the input model's", "fusion"),
                # The id stays 'keep_target' (saved workflows and API graphs use it); the label says what it is. The
                # frontend labels widgets from locales/en/nodeDefs.json, so the label is there too.
                io.Combo.Input("keep_target", display_name="preservation_target", options=list(PRESERVATION_TARGETS),
                               default="input model", optional=True,
                               tooltip="What generic prompts and the concepts to preserve are held to. input model: "
                                       "the connected (refined) model, so refinement's wider reach, e.g. to the "
                                       "concepts' synonyms, stays. original model: the checkpoint's weights, as in "
                                       "the paper, which pulls refinement back outside the concepts' own prompts."),
                concept_list_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with every concept's LoRA fused in, ready for KSampler or "
                                             "MACE Save Erasure.")],
        )

    @classmethod
    def execute(cls, model, clip, loras, preserve, preservation_strength, lambda_, keep_target="input model",
                concept_list=None):
        return io.NodeOutput(fuse_model(model, clip, loras, preserve, preservation_strength, lambda_,
                                        PRESERVATION_TARGETS.get(keep_target, keep_target), concept_list))


def progress_units(loras: int, preserved: int, preservation_strength: float) -> int:
    """Fuse's progress units: the prior, each LoRA, each preserved concept (encoded only where it weighs), the solve
    (MACE Erase's bar reads it too)."""
    return 2 + loras + (preserved if preservation_strength > 0 else 0)


def fuse_model(model, clip, bundle, preserve="", preservation_strength=1.0, lambda_=0.01,
               preservation_target="input", concept_list=None):
    """Validate, solve, then patch a clone. Nothing is applied until every step has succeeded. A connected
    concept_list supplies preserve and the corpus, and its concepts' own prompts and nicknames join the LoRAs'."""
    cl = stage_list(concept_list, "MACE Fuse", preserve=preserve)
    preserved = list(cl.preserve)
    keys = host.cross_attention_keys(model, clip)
    loras = list(getattr(bundle, "loras", None) or [])
    known = check_against_list(loras, cl) if concept_list is not None else None
    if loras:
        check_base(model, getattr(bundle, "base", ""), "this LoRA bundle", "loras")
    enc = host.clip_encoder(clip)
    progress = host.Progress(progress_units(len(loras), len(preserved), preservation_strength))
    t0 = time.perf_counter()
    prior = prior_for(clip, enc, corpus=cl.corpus) if preservation_strength > 0 else None
    progress()
    device = host.compute_device()
    current = host.CurrentWeights(model, keys, device)  # read per matrix (preservation_target 'original' only)
    original = host.original_weights(model, keys)
    # deltas come out in the dtype they are patched in, so no second full-size copy exists
    deltas = fuse(loras, enc, current, original, prior, preserved, prior_weight=preservation_strength,
                  preserve_weight=preservation_strength, lam=lambda_, device=device, progress=progress,
                  preservation_target=preservation_target, out_dtype=host.patch_dtype(original[keys[0]].dtype),
                  concepts=known)
    progress()
    out = host.with_deltas(model, deltas)
    record_erased(out, loras)
    log.info("MACE fuse: %d LoRAs into %d matrices in %.2fs", len(loras), len(deltas), time.perf_counter() - t0)
    return out


def check_against_list(loras, cl) -> dict:
    """The list and the LoRAs must agree on each concept they share (else the stages disagree): the same anchor and
    type. A LoRA the list lacks, or a listed concept without a LoRA, is fused as it is, with a warning."""
    known = cl.by_name()
    for lora in loras:
        c = known.get(lora.concept.lower())
        if c is None:
            log.warning("MACE fuse: the LoRA for '%s' is not in the connected concept list; fused with its own "
                        "anchor and type", lora.concept)
        elif (c.anchor, c.concept_type) != (lora.anchor, lora.concept_type):
            raise MaceInputError("concept_list", f"'{c.name}' is listed with anchor '{c.anchor}' ({c.concept_type}), "
                                                 f"but its LoRA was trained with '{lora.anchor}' "
                                                 f"({lora.concept_type}).",
                                 "Connect the list the LoRAs were trained with, or train them again.")
    have = {lora.concept.lower() for lora in loras}
    missing = [c.name for c in cl.concepts if c.name.lower() not in have]
    if missing:
        log.warning("MACE fuse: no LoRA for %s of the concept list", ", ".join(missing))
    return known


NODES = [MACEFuseLoRAs]
