"""MACE Save Erasure: the erased model's change to its cross-attention as one LoRA file any ComfyUI can load."""

import logging
import os

from comfy_api.latest import io, ui

from ..mace_core import lora_files
from ..mace_core.concepts import Concept, split_line, where_line
from ..mace_core.errors import MaceInputError
from . import host
from .fuse import erased_concepts
from .inputs import MaceLoras, concept_list_input, stage_list
from .loras import inside, loras_root
from .pooled import warn_if_pooled_edit_left_out

log = logging.getLogger("MACE")

MODES = ["full", "low rank"]


class MACESaveErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACESaveErasure",
            display_name="MACE Save Erasure",
            category="MACE",
            description="Saves what the MACE nodes changed (their own patches on every cross-attention key/value "
                        "projection; other LoRAs on the model are left out) to "
                        "models/loras/<filename_prefix>.safetensors. The stock Load LoRA node at strength 1 on the "
                        "same checkpoint (with the same other LoRAs) reproduces the erased model. The erased "
                        "concepts, their anchors and the base model's fingerprint are recorded in the file.",
            inputs=[
                io.Model.Input("model", tooltip="The erased model (after MACE Refine and/or MACE Fuse LoRAs)."),
                io.String.Input("filename_prefix", default="mace/erasure",
                                tooltip="File name under models/loras, without extension; may contain subfolders. "
                                        "An existing file of that name is replaced."),
                io.Combo.Input("mode", options=MODES, default="full",
                               tooltip="'full' stores each weight difference exactly (.diff keys, about 38 MB for "
                                       "SD1.5 in fp16); 'low rank' stores an SVD truncation as lora_up/lora_down "
                                       "(smaller, approximate; the error is logged and recorded in the file)."),
                io.Int.Input("rank", default=64, min=1, max=1024,
                             tooltip="Rank per matrix in 'low rank' mode (ignored for 'full')."),
                MaceLoras.Input("loras", optional=True,
                                tooltip="Optional: the LoRA bundle, to record its concepts and anchors in the file. "
                                        "Concepts fused with MACE Fuse LoRAs are recorded without it."),
                io.String.Input("concepts", multiline=True, default="", optional=True,
                                tooltip="Optional: further erased concepts to record (e.g. refined only), one per line "
                                        "as in the other MACE nodes: 'concept', 'concept => anchor', 'concept | type' "
                                        "or 'concept => anchor | type'."),
                concept_list_input(),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix, mode, rank, loras=None, concepts="", concept_list=None):
        path, err = save_erasure(model, filename_prefix, mode, rank, loras, concepts, concept_list)
        text = os.path.relpath(path, loras_root())
        if mode == "low rank":
            text += f" (rank {rank}, relative error {err:.2%})"
        return io.NodeOutput(ui=ui.PreviewText(text))


def _concepts(model, bundle, text, concept_list=None) -> list[Concept]:
    found = {}
    records = erased_concepts(model) + [{"concept": lora.concept, "anchor": lora.anchor,
                                         "concept_type": lora.concept_type}
                                        for lora in getattr(bundle, "loras", None) or []]
    if concept_list is not None:  # the list says exactly what was erased, so no box needs typing a third time
        stage_list(concept_list, "MACE Save Erasure", concepts=text)
        records += [{"concept": c.name, "anchor": c.anchor, "concept_type": c.concept_type}
                    for c in concept_list.concepts]
        text = ""  # it said what the list says (stage_list refuses anything else)
    # The box takes the concept-list syntax, read by the one parser every MACE node uses: 'Claude Monet | style' is
    # the concept 'Claude Monet' of type style, not a name with a bar in it. Anchor and type stay as written ('' =
    # not given): the erasure was made elsewhere, so their defaults are unknown here.
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        parts = split_line(raw, where_line(line_no), "concepts")
        if parts is None:
            continue
        name, anchor, concept_type = parts
        if not name:
            raise MaceInputError("concepts", f"line {line_no} has an anchor or type but no concept.",
                                 "Write the concept first: 'concept => anchor | type'.")
        records.append({"concept": name, "anchor": anchor, "concept_type": concept_type})
    for r in records:
        found.setdefault(r["concept"].lower(), Concept(r["concept"], r["anchor"], r["concept_type"]))
    return list(found.values())


def erasure_deltas(model) -> dict:
    """MACE's own change to the cross-attention (float32, compute device): the sum of the patches MACE nodes added,
    not current minus checkpoint weights, so a LoRA loaded upstream (or downstream) stays out of the erasure file."""
    keys = host.cross_attention_keys(model)
    deltas = {k: d for k, d in host.mace_deltas(model, keys, host.compute_device()).items() if bool(d.any())}
    warn_if_pooled_edit_left_out(model, "the erasure file")
    if not deltas:
        raise MaceInputError("model", "this model's cross-attention carries no MACE change: there is no erasure to "
                                      "save.", "Connect the output of MACE Refine Cross-Attention or MACE Fuse LoRAs.")
    return deltas


def save_erasure(model, filename_prefix="mace/erasure", mode="full", rank=64, bundle=None, concepts="",
                 concept_list=None):
    if mode not in MODES:
        raise MaceInputError("mode", f"unknown mode '{mode}'.", f"Use one of: {', '.join(MODES)}.")
    prefix = (filename_prefix or "").strip() or "mace/erasure"
    path = inside(loras_root(), prefix + ".safetensors", "filename_prefix")
    deltas = erasure_deltas(model)
    keys = host.cross_attention_keys(model)
    # a fp16 checkpoint gets fp16 differences; an fp8 one not fp8 (host.patch_dtype: the delta would not survive)
    dtype = host.patch_dtype(host.original_weights(model, keys)[keys[0]].dtype)
    progress = host.Progress(len(deltas) + 1)
    tensors, err = lora_files.erasure_tensors(deltas, mode, rank, dtype, progress)
    meta = lora_files.erasure_metadata(_concepts(model, bundle, concepts, concept_list), host.model_fingerprint(model),
                                       mode, rank, err)
    if os.path.exists(path):
        log.warning("MACE: replacing %s", path)
    lora_files.write(path, tensors, meta)
    progress()
    if mode == "low rank":
        log.info("MACE: saved erasure to %s (%d matrices, rank %d, relative Frobenius error %.4f)", path, len(deltas),
                 rank, err)
    else:
        log.info("MACE: saved erasure to %s (%d matrices, full differences)", path, len(deltas))
    return path, err


NODES = [MACESaveErasure]
