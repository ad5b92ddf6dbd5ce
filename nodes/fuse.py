"""MACE Fuse LoRAs: stage 3 as a node."""

import logging
import time

from comfy_api.latest import io

from ..mace_core.concepts import parse_names
from ..mace_core.fuse import fuse
from . import host
from .loras import MaceLoras, check_base
from .refine import prior_for

log = logging.getLogger("MACE")

# model_options entry listing what a patched clone erases, so MACE Save Erasure can record it in the file.
ERASED = "mace_erased"


def erased_concepts(model) -> list[dict]:
    return list(getattr(model, "model_options", {}).get(ERASED, []))


def record_erased(model, loras):
    """Appends the bundle's concepts to the clone's record (clone() deep-copies model_options: the input keeps its)."""
    have = {e["concept"].lower() for e in erased_concepts(model)}
    new = [{"concept": lora.concept, "anchor": lora.anchor, "family": lora.family}
           for lora in loras if lora.concept.lower() not in have]
    model.model_options[ERASED] = erased_concepts(model) + new


class MACEFuseLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEFuseLoRAs",
            display_name="MACE Fuse LoRAs",
            category="MACE",
            description="Closed-form fusion of many per-concept LoRAs into the cross-attention key/value weights "
                        "(MACE stage 3): on every concept's prompts the result reproduces that concept's LoRA, while "
                        "generic prompts and the concepts to keep stay near the original model. Unlike stacking LoRAs, "
                        "the concepts do not interfere. Returns a patched copy of the model; the input is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRAs were trained on: usually the output of MACE "
                                                "Refine Cross-Attention."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model; each concept's prompts are "
                                              "encoded with it."),
                MaceLoras.Input("loras", tooltip="Per-concept LoRAs, from MACE Train or MACE Load LoRAs."),
                io.String.Input("preserve", multiline=True, default="",
                                tooltip="Concepts to keep intact, one per line (e.g. other celebrities or artists)."),
                io.Float.Input("preservation_strength", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="How much generic prompts and the concepts to keep weigh against the erased "
                                       "concepts' prompts (1 = equal total weight, 0 = no preservation)."),
                io.Float.Input("lambda_", display_name="lambda", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Ridge term that keeps weights near the input model's, relative to the mean "
                                       "eigenvalue of the concept statistics. Raise it for a gentler fusion."),
            ],
            outputs=[io.Model.Output(tooltip="The model with every concept's LoRA fused in, ready for KSampler or "
                                             "MACE Save Erasure.")],
        )

    @classmethod
    def execute(cls, model, clip, loras, preserve, preservation_strength, lambda_):
        return io.NodeOutput(fuse_model(model, clip, loras, preserve, preservation_strength, lambda_))


def fuse_model(model, clip, bundle, preserve="", preservation_strength=1.0, lambda_=0.01):
    """Validate, solve, then patch a clone. Nothing is applied until every step has succeeded."""
    keep = parse_names(preserve)
    keys = host.cross_attention_keys(model, clip)
    loras = list(getattr(bundle, "loras", None) or [])
    if loras:
        check_base(model, getattr(bundle, "base", ""), "this LoRA bundle", "loras")
    enc = host.clip_encoder(clip)
    progress = host.Progress(len(loras) + 2)
    t0 = time.perf_counter()
    prior = prior_for(clip, enc) if preservation_strength > 0 else None
    progress()
    device = host.compute_device()
    current = host.current_weights(model, keys, device)
    original = host.original_weights(model, keys)
    deltas = fuse(loras, enc, current, original, prior, keep, prior_weight=preservation_strength,
                  preserve_weight=preservation_strength, lam=lambda_, device=device, progress=progress)
    progress()
    out = host.with_deltas(model, deltas)
    record_erased(out, loras)
    log.info("MACE fuse: %d LoRAs into %d matrices in %.2fs", len(loras), len(deltas), time.perf_counter() - t0)
    return out


NODES = [MACEFuseLoRAs]
