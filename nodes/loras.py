"""MACE Save LoRAs / MACE Load LoRAs: per-concept LoRA files under models/loras, in the stock LoraLoader's format."""

import logging
import os
import re

import comfy.lora
import folder_paths
from comfy_api.latest import io, ui

from ..mace_core import lora_files
from ..mace_core.concepts import CONCEPT_TYPES, DEFAULT_ANCHORS, parse_concepts
from ..mace_core.errors import MaceInputError
from ..mace_core.lora_bundle import LoRABundle
from . import host
from .inputs import MaceLoras, concept_list_input, stage_list

log = logging.getLogger("MACE")

SUBFOLDER = "mace"


# ---------------------------------------------------------------- shared with fuse.py and erasure.py

def lora_shapes(model, keys: list[str]) -> dict[str, tuple]:
    return {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}


def lora_key_map(model, keys: list[str]) -> dict[str, str]:
    """Every LoRA module name ComfyUI's loader understands for these weights (LDM, kohya, diffusers, PEFT names).

    ComfyUI internal (candidate for host.py): comfy.lora.model_lora_keys_unet on the patcher's BaseModel.
    """
    wanted = set(keys)
    key_map = {m: k for m, k in comfy.lora.model_lora_keys_unet(model.model, {}).items() if k in wanted}
    return lora_files.default_key_map(keys) | key_map


def check_base(model, base: str, what: str, input_name: str):
    """A recorded base-model fingerprint must match this model's (an empty one is unknown and passes)."""
    if base and base != host.model_fingerprint(model):
        raise MaceInputError(input_name, f"{what} was made for another base model (fingerprint {base}, this model "
                                         f"{host.model_fingerprint(model)}).",
                             "Connect the checkpoint it was trained on, or load it with check_base off.")


def loras_root() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def inside(root: str, relative: str, input_name: str) -> str:
    """root/relative, refusing absolute paths and '..' that would leave the folder."""
    path = os.path.normpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != \
            os.path.abspath(root):
        raise MaceInputError(input_name, f"'{relative}' points outside models/loras.",
                             "Give a path relative to the loras folder.")
    return path


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:60].strip("-") or "concept"


# ---------------------------------------------------------------- save

class MACESaveLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACESaveLoRAs",
            display_name="MACE Save LoRAs",
            category="MACE",
            description="Writes each concept's LoRA from a MACE LoRA bundle to models/loras/mace/"
                        "<prefix>_<concept>.safetensors, in the format the stock Load LoRA node reads, with the "
                        "concept, anchor, type, rank, steps and base model recorded in the file. Existing files of "
                        "the same name are replaced.",
            inputs=[
                MaceLoras.Input("loras", tooltip="The per-concept LoRAs (from MACE Train or MACE Load LoRAs)."),
                io.String.Input("filename_prefix", default="mace",
                                tooltip="Start of each file name; may contain subfolders (inside models/loras/mace)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, loras, filename_prefix):
        paths = save_loras(loras, filename_prefix)
        text = "\n".join(os.path.relpath(p, loras_root()) for p in paths)
        return io.NodeOutput(ui=ui.PreviewText(text))


def save_loras(bundle: LoRABundle, filename_prefix: str = "mace") -> list[str]:
    if bundle is None or not bundle.loras:
        raise MaceInputError("loras", "the LoRA bundle is empty.", "Connect the output of MACE Train.")
    prefix = (filename_prefix or "").strip() or "mace"
    folder = inside(os.path.join(loras_root(), SUBFOLDER), os.path.dirname(prefix), "filename_prefix")
    base_name = os.path.basename(prefix) or "mace"
    paths, used = [], set()
    for lora in bundle.loras:
        name = f"{base_name}_{slug(lora.concept)}"
        n = 2
        while name in used:  # two concepts with the same slug ('A.B' and 'A B') keep separate files
            name, n = f"{base_name}_{slug(lora.concept)}-{n}", n + 1
        used.add(name)
        path = os.path.join(folder, name + ".safetensors")
        if os.path.exists(path):
            log.warning("MACE: replacing %s", path)
        lora_files.save_lora(path, lora, bundle.base)
        paths.append(path)
    log.info("MACE: saved %d LoRAs to %s", len(paths), folder)
    return paths


# ---------------------------------------------------------------- load

class MACELoadLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        anchors = ", ".join(f"{f}: '{a}'" for f, a in DEFAULT_ANCHORS.items())
        return io.Schema(
            node_id="MACELoadLoRAs",
            display_name="MACE Load LoRAs",
            category="MACE",
            description="Reads per-concept LoRA files from models/loras into a MACE LoRA bundle for MACE Fuse LoRAs: "
                        "files saved by MACE Save LoRAs, or LoRAs trained elsewhere (any plain LoRA the Load LoRA "
                        "node reads) with the concept each one erases. Keys and shapes are checked against the model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRAs will be fused into; their keys and shapes are "
                                                "checked against it."),
                io.String.Input("files", multiline=True, default="mace",
                                tooltip="One entry per line, relative to models/loras: a .safetensors file or a folder "
                                        "(all its .safetensors files). For files without MACE metadata write "
                                        "'file => concept' or 'file => concept => anchor'. Lines starting with # are "
                                        "ignored."),
                io.Combo.Input("concept_type", options=list(CONCEPT_TYPES), default="celebrity",
                               tooltip="Prompt templates for LoRAs whose file does not record a concept type."),
                io.String.Input("anchor", default="",
                                tooltip=f"Anchor for LoRAs whose file records none. Blank uses the type's default "
                                        f"({anchors})."),
                io.Boolean.Input("check_base", default=True,
                                 tooltip="Refuse MACE files recorded for another base model. Turn off to fuse LoRAs "
                                         "trained on a related checkpoint."),
                concept_list_input(),
            ],
            outputs=[MaceLoras.Output(display_name="loras", tooltip="The loaded LoRAs, one per concept.")],
        )

    @classmethod
    def execute(cls, model, files, concept_type, anchor, check_base, concept_list=None):
        return io.NodeOutput(load_loras(model, files, concept_type, anchor, check_base, concept_list))


def _entries(text: str) -> list[tuple[int, str, str, str]]:
    out = []
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("=>")]
        if len(parts) > 3 or not parts[0]:
            raise MaceInputError("files", f"line {line_no} ('{line}') is not 'file', 'file => concept' or "
                                          "'file => concept => anchor'.")
        parts += [""] * (3 - len(parts))
        out.append((line_no, *parts))
    if not out:
        raise MaceInputError("files", "no files given.", "Write one file or folder under models/loras per line.")
    return out


def _resolve(name: str, line_no: int) -> list[str]:
    roots = folder_paths.get_folder_paths("loras")
    for root in roots:
        path = inside(root, name, "files")
        for p in (path, path + ".safetensors"):
            if os.path.isfile(p):
                return [p]
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not found:
                raise MaceInputError("files", f"line {line_no}: folder '{name}' holds no .safetensors files.")
            return found
    raise MaceInputError("files", f"line {line_no}: '{name}' is not a file or folder under models/loras.",
                         "Give a path relative to the loras folder, e.g. 'mace/mace_claude-monet.safetensors'.")


def load_loras(model, files: str, concept_type: str = "celebrity", anchor: str = "", check: bool = True,
               concept_list=None) -> LoRABundle:
    """A connected concept_list gives the type and anchor of LoRAs whose file records none (foreign LoRAs named by
    'file => concept'); what a MACE file records stays, and MACE Fuse refuses it if it disagrees with the list."""
    known = {}
    if concept_list is not None:
        stage_list(concept_list, "MACE Load LoRAs", anchor=anchor)
        known, concept_type, anchor = concept_list.by_name(), concept_list.concept_type, concept_list.anchor
    keys = host.cross_attention_keys(model)
    shapes = lora_shapes(model, keys)
    key_map = lora_key_map(model, keys)
    loaded, seen, bases = [], {}, set()
    for line_no, name, concept, own_anchor in _entries(files):
        paths = _resolve(name, line_no)
        if concept and len(paths) > 1:
            raise MaceInputError("files", f"line {line_no}: '{name}' is a folder; a concept can be given only for "
                                          "one file.")
        for path in paths:
            lora, base = lora_files.load_lora(path, shapes, key_map, concept, own_anchor, input_name="files")
            fname = os.path.basename(path)
            bases.add(base)
            if check:
                check_base(model, base, f"'{fname}'", "files")
            # Validate the name and anchor exactly as typed concepts are; the file's type wins over concept_type.
            listed = known.get(lora.concept.lower())
            if listed is not None and lora.concept_type not in CONCEPT_TYPES:
                lora.concept_type = listed.concept_type
            if listed is not None and not lora.anchor:
                lora.anchor = listed.anchor
            ctype = lora.concept_type if lora.concept_type in CONCEPT_TYPES else concept_type
            c = parse_concepts(f"{lora.concept} => {lora.anchor}" if lora.anchor else lora.concept, ctype, anchor,
                               input_name="files")[0]
            lora.concept, lora.anchor, lora.concept_type = c.name, c.anchor, c.concept_type
            if c.name.lower() in seen:
                raise MaceInputError("files", f"concept '{c.name}' comes from two files ('{seen[c.name.lower()]}' and "
                                              f"'{fname}').", "Keep one LoRA per concept.")
            seen[c.name.lower()] = fname
            loaded.append(lora)
    # The bundle names a base only when every file agrees on it; fuse checks it again against its own model.
    base = bases.pop() if check and len(bases) == 1 else ""
    log.info("MACE: loaded %d LoRAs (%s)", len(loaded), ", ".join(lora.concept for lora in loaded))
    return LoRABundle(loaded, base, {"source": "files"})


NODES = [MACESaveLoRAs, MACELoadLoRAs]
