"""Pooled-vector editing as a step of MACE Refine (mace_core/pooled.py): SDXL's label embedding, where the CLIP's
pooled vector enters the UNet beside the cross-attention."""

import logging
import time

from ..mace_core.closed_form import WeightDeltas
from ..mace_core.pooled import pooled_delta, pooled_transform
from ..mace_core.prior import generic_prompts
from . import host

log = logging.getLogger("MACE")

# MACE Refine's edit_pooled default: on where it was measured to help (docs/sdxl_world.md)
EDIT_POOLED_DEFAULT = False


def edit_pooled_input():
    from comfy_api.latest import io

    return io.Boolean.Input("edit_pooled", default=EDIT_POOLED_DEFAULT, optional=True,
                            tooltip="SDXL only: also edit the label embedding's pooled-text columns, where the "
                                    "CLIP's pooled vector enters the UNet beside the cross-attention, so the "
                                    "concepts' pooled vectors act as the anchor's (generic and preserved prompts held, "
                                    "same closed form). No effect on SD1.x/SD2.x.")


def pooled_deltas(model, clip, items, preserved, preservation_strength=1.0, lambda_=0.01) -> WeightDeltas:
    """{label-embedding key: delta in the patch dtype} mapping the concepts' pooled vectors onto their anchors', or
    none for a family without a pooled road (SD1.x/SD2.x). Generic prompts are the same ones refinement's prior uses."""
    key = host.pooled_key(model, clip)
    if key is None:
        return WeightDeltas()
    t0 = time.perf_counter()

    def encode(prompts):
        return host.encode_pooled(clip, prompts)

    t = pooled_transform(items, encode, generic_prompts(), preserved, prior_weight=preservation_strength,
                         preserve_weight=preservation_strength, lam=lambda_)
    # against the weight this MODEL computes with (a refined or LoRA-carrying input included), as K/V refinement does
    w = host.current_weights(model, [key], host.compute_device())[key]
    dtype = host.patch_dtype(host.original_weights(model, [key])[key].dtype)
    delta = pooled_delta(w, t).to(dtype)
    log.info("MACE refine: pooled vector (%d wide) edited for %d concepts in %.2fs", t.shape[0], len(items),
             time.perf_counter() - t0)
    return WeightDeltas({key: delta})


def warn_if_pooled_edit_left_out(model, what: str):
    """Log a warning when a consumer that reads only the cross-attention (MACE Save Erasure) meets a model that
    carries a MACE pooled edit, so the user learns that the file holds less than the model does."""
    if host.POOLED_KEY not in model.get_key_patches("diffusion_model."):
        return
    if host.mace_deltas(model, [host.POOLED_KEY]):
        log.warning("MACE: %s holds the cross-attention change only; this model's pooled-vector edit (edit_pooled, "
                    "%s) is not in it.", what, host.POOLED_KEY)
