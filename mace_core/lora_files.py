"""LoRA tensors <-> safetensors files that ComfyUI's stock LoraLoader (and kohya-style tools) read.

Written keys, per cross-attention weight `diffusion_model.<module>.weight`:
    diffusion_model.<module>.lora_up.weight   (out, rank)
    diffusion_model.<module>.lora_down.weight (rank, in)
    diffusion_model.<module>.alpha            scalar; the loader scales by alpha / rank
or, for a full erasure, `diffusion_model.<module>.diff` (out, in), added as is (times the LoRA strength).
MACE facts (concept, anchor, concept type, rank, steps, base model fingerprint, format version) go in the safetensors
header metadata as strings under `mace_*` names.

Reading accepts every low-rank naming the stock loader knows for a linear layer (lora_up/lora_down, lora_A/lora_B,
diffusers and PEFT variants, kohya `lora_unet_*` names via the key map) and `.diff`. Only safetensors are read: a
pickled checkpoint can run code when loaded, so it is refused before it is opened.
"""

import json
import logging
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .concepts import Concept
from .errors import MaceInputError
from .lora_bundle import ConceptLoRA

log = logging.getLogger("MACE")

# Where files record a concept's type: these names were written before the code called the idea concept_type, and
# files already shared carry them, so they stay as they are (a rename would need a new format version).
META_CONCEPT_TYPE = "mace_family"  # a concept LoRA's header entry
RECORD_CONCEPT_TYPE = "family"  # each concept's entry in an erasure's mace_concepts list

FORMAT_VERSION = "1"
PREFIX = "diffusion_model."

# (up suffix, down suffix), longest first so '.lora_B.default.weight' wins over '.lora_B'.
_PAIRS = [
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
]
_OTHER = {".alpha": "alpha", ".diff": "diff", ".dora_scale": "dora", ".lora_mid.weight": "mid"}
_SUFFIXES = sorted([(u, "up") for u, _ in _PAIRS] + [(d, "down") for _, d in _PAIRS] + list(_OTHER.items()),
                   key=lambda s: -len(s[0]))
_UNSUPPORTED = ("hada_", "lokr_", "oft_", "a1.weight", "b1.weight")
_PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def module_of(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def default_key_map(model_keys) -> dict[str, str]:
    """LoRA module names -> model weight keys for the names any host understands: 'diffusion_model.<module>' and
    kohya's 'lora_unet_<module with underscores>' over the same (LDM) layout. Hosts add their own (diffusers) names."""
    out = {}
    for k in model_keys:
        m = module_of(k)
        out[m] = k
        inner = m[len(PREFIX):] if m.startswith(PREFIX) else m
        out["lora_unet_" + inner.replace(".", "_")] = k
    return out


# ---------------------------------------------------------------- writing

def lora_tensors(lora: ConceptLoRA) -> dict[str, torch.Tensor]:
    sd = {}
    for k in lora.keys:
        m = module_of(k)
        down = lora.down[k]
        sd[f"{m}.lora_up.weight"] = lora.up[k].detach().contiguous().cpu()
        sd[f"{m}.lora_down.weight"] = down.detach().contiguous().cpu()
        # The loader scales by alpha / down.shape[0]; writing scale * rank keeps its result equal to ours.
        sd[f"{m}.alpha"] = torch.tensor(lora.scale * down.shape[0], dtype=torch.float32)
    return sd


def lora_metadata(lora: ConceptLoRA, base: str = "") -> dict[str, str]:
    return {
        "mace_format_version": FORMAT_VERSION,
        "mace_kind": "concept_lora",
        "mace_concept": lora.concept,
        "mace_anchor": lora.anchor,
        META_CONCEPT_TYPE: lora.concept_type,
        "mace_rank": str(lora.rank),
        "mace_alpha": "" if lora.alpha is None else repr(float(lora.alpha)),
        "mace_steps": str(lora.steps),
        "mace_base_model": base or "",
        "mace_meta": json.dumps(lora.meta, default=str, sort_keys=True),
        # kohya's names, so LoRA managers show rank and alpha
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": repr(float(lora.scale * lora.rank)),
    }


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Atomic write: a crash or a cancel never leaves half a file under the final name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def save_lora(path: str, lora: ConceptLoRA, base: str = ""):
    write(path, lora_tensors(lora), lora_metadata(lora, base))


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-r factors (Eckart-Young) of delta: up (out, r) = U S, down (r, in) = V^T.
    Returns up, down, the squared Frobenius norm left out and the squared norm of delta."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    r = max(1, min(rank, s.shape[0]))
    up, down = u[:, :r] * s[:r], vh[:r]
    return up, down, float((s[r:] ** 2).sum()), float((s**2).sum())


def erasure_tensors(deltas: dict[str, torch.Tensor], mode: str, rank: int = 16, dtype=None,
                    progress=None) -> tuple[dict[str, torch.Tensor], float]:
    """A full ('.diff') or low-rank ('lora_up/lora_down/alpha') file body for weight differences.
    Returns the tensors and the relative Frobenius error over all matrices (0 for 'full')."""
    sd, lost, total = {}, 0.0, 0.0
    for k in sorted(deltas):
        delta = deltas[k]
        out_dtype = dtype or delta.dtype
        m = module_of(k)
        if mode == "full":
            sd[f"{m}.diff"] = delta.detach().to("cpu", out_dtype).contiguous()
        elif mode == "low rank":
            up, down, l2, t2 = low_rank(delta, rank)
            lost, total = lost + l2, total + t2
            sd[f"{m}.lora_up.weight"] = up.to("cpu", out_dtype).contiguous()
            sd[f"{m}.lora_down.weight"] = down.to("cpu", out_dtype).contiguous()
            sd[f"{m}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)  # scale 1
        else:
            raise MaceInputError("mode", f"unknown mode '{mode}'.", "Use 'full' or 'low rank'.")
        if progress:
            progress()
    return sd, (lost / total) ** 0.5 if total > 0 else 0.0


def erasure_metadata(concepts: list[Concept], base: str, mode: str, rank: int, rel_error: float) -> dict[str, str]:
    return {
        "mace_format_version": FORMAT_VERSION,
        "mace_kind": "erasure",
        "mace_mode": mode,
        "mace_rank": str(rank) if mode == "low rank" else "full",
        "mace_relative_error": f"{rel_error:.6g}",
        "mace_concepts": json.dumps([{"concept": c.name, "anchor": c.anchor, RECORD_CONCEPT_TYPE: c.concept_type}
                                     for c in concepts]),
        "mace_erased": ", ".join(c.name for c in concepts),
        "mace_anchors": ", ".join(sorted({c.anchor for c in concepts})),
        "mace_base_model": base or "",
    }


# ---------------------------------------------------------------- reading

def _check_safetensors(path: str, input_name: str):
    name = os.path.basename(path)
    if path.lower().endswith(_PICKLE_EXT):
        raise MaceInputError(input_name, f"'{name}' is a pickled checkpoint, which can run code when opened.",
                             "MACE reads only .safetensors files; convert it with a tool you trust.")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            ok = 2 <= n <= size - 8 and n < 256 * 2**20
            header = json.loads(f.read(n)) if ok else None
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise MaceInputError(input_name, f"'{name}' is not a safetensors file.",
                             "MACE reads LoRAs only in the .safetensors format.")


def read(path: str, input_name: str = "files") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with a clear error for anything else."""
    if not os.path.isfile(path):
        raise MaceInputError(input_name, f"no file '{path}'.")
    _check_safetensors(path, input_name)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # damaged body behind a valid header
        raise MaceInputError(input_name, f"'{os.path.basename(path)}' could not be read as safetensors ({e}).") from e
    return tensors, meta


def _split(name: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return None


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    # conv-style LoRA layers store linear factors as (out, in, 1, 1)
    while t.ndim > 2 and t.shape[-1] == 1:
        t = t[..., 0]
    return t


def parse_lora(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple], key_map: dict[str, str],
               source: str = "", input_name: str = "files") -> dict[str, dict]:
    """Group a LoRA state dict by model key: {key: {'up','down','alpha'} or {'diff'}} for the keys in `shapes`.

    Tensors for other layers are left out (logged); anything on the cross-attention keys that cannot be fused
    exactly (LoHa, LoKr, DoRA, LoCon mid weights) is refused rather than approximated.
    """
    name = os.path.basename(source) or "the file"
    groups: dict[str, dict] = {}
    other = 0
    for t_name, t in tensors.items():
        split = _split(t_name)
        prefix, role = split if split else (None, None)
        key = key_map.get(prefix) if prefix is not None else None
        if key is None:
            # a tensor of an adapter type we cannot fuse, on a key we edit, must not be dropped silently
            if any(u in t_name for u in _UNSUPPORTED):
                parts = t_name.split(".")
                if any(key_map.get(".".join(parts[:-n])) in shapes for n in (1, 2) if len(parts) > n):
                    raise MaceInputError(input_name, f"'{name}' stores '{t_name}' (LoHa/LoKr/OFT-style weights), "
                                                     "which cannot be fused exactly.",
                                         "Use a plain LoRA (lora_up/lora_down or lora_A/lora_B) file.")
            other += 1
            continue
        if key not in shapes:
            other += 1
            continue
        groups.setdefault(key, {})[role] = t
    if not groups:
        sample = ", ".join(sorted(tensors)[:3]) or "no tensors at all"
        raise MaceInputError(input_name, f"'{name}' has no cross-attention key/value (attn2 to_k/to_v) weights this "
                                         f"model can use (it holds e.g. {sample}).",
                             "Use a LoRA trained on this model family's UNet cross-attention.")
    if other:
        log.info("MACE: %s: %d tensors outside this model's attn2 to_k/to_v left out", name, other)
    out = {}
    for key, g in sorted(groups.items()):
        o, i = shapes[key]
        if "dora" in g or "mid" in g:
            raise MaceInputError(input_name, f"'{name}' uses DoRA/LoCon weights on '{key}', which cannot be fused "
                                             "exactly.", "Use a plain LoRA file.")
        if "diff" in g:
            diff = _as_matrix(g["diff"])
            if tuple(diff.shape) != (o, i):
                raise MaceInputError(input_name, f"'{name}' has a {tuple(diff.shape)} difference for '{key}', but the "
                                                 f"model's weight is {o} x {i}.",
                                     "It was made for another model; use the model it belongs to.")
            out[key] = {"diff": diff}
            continue
        if "up" not in g or "down" not in g:
            raise MaceInputError(input_name, f"'{name}' has only half a LoRA (up or down matrix) for '{key}'.",
                                 "The file is incomplete; export it again.")
        up, down = _as_matrix(g["up"]), _as_matrix(g["down"])
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != o or down.shape[1] != i or up.shape[1] != down.shape[0]:
            raise MaceInputError(input_name, f"'{name}' has up {tuple(up.shape)} and down {tuple(down.shape)} for "
                                             f"'{key}', but the model's weight is {o} x {i}.",
                                 "It was made for another model (e.g. SD1.x vs SDXL); use the model it belongs to.")
        alpha = g.get("alpha")
        out[key] = {"up": up, "down": down, "alpha": None if alpha is None else float(alpha.float().item())}
    return out


_UNSET = object()


def to_concept_lora(parsed: dict[str, dict], concept: str, anchor: str, concept_type: str, meta: dict,
                    steps: int = 0, alpha_hint=_UNSET) -> ConceptLoRA:
    """One ConceptLoRA from parse_lora's groups. A uniform rank and scale are kept as (rank, alpha); mixed ranks or
    per-key alphas (kohya dynamic rank) and full differences are folded into the up matrices (scale 1)."""
    ranks, scales = {}, {}
    for k, g in parsed.items():
        if "diff" in g:
            ranks[k], scales[k] = g["diff"].shape[1], 1.0
        else:
            r = g["down"].shape[0]
            ranks[k], scales[k] = r, 1.0 if g["alpha"] is None else g["alpha"] / r
    uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1 and all("diff" not in g
                                                                                       for g in parsed.values())
    up, down = {}, {}
    if uniform:
        r, s = next(iter(ranks.values())), next(iter(scales.values()))
        if alpha_hint is not _UNSET and (alpha_hint is None and s == 1.0 or alpha_hint is not None
                                         and abs(alpha_hint / r - s) <= 1e-6 * abs(s)):
            alpha = alpha_hint  # MACE's own file: give back exactly what was saved
        else:
            alpha = None if s == 1.0 else s * r
        for k, g in parsed.items():
            up[k], down[k] = g["up"], g["down"]
        return ConceptLoRA(concept, anchor, concept_type, r, steps, up, down, alpha, meta)
    for k, g in parsed.items():
        if "diff" in g:
            # exact as a rank-`in` factorisation: diff @ I
            up[k], down[k] = g["diff"], torch.eye(g["diff"].shape[1], dtype=g["diff"].dtype)
        else:
            up[k], down[k] = g["up"] * scales[k], g["down"]
    return ConceptLoRA(concept, anchor, concept_type, max(ranks.values()), steps, up, down, None, meta)


def load_lora(path: str, shapes: dict[str, tuple], key_map: dict[str, str] | None = None, concept: str = "",
              anchor: str = "", concept_type: str = "", input_name: str = "files") -> tuple[ConceptLoRA, str]:
    """A LoRA file as one concept's update, and the base-model fingerprint it records ('' when unknown).

    concept/anchor/concept_type given here win over what a MACE file records; a foreign file needs at least the concept.
    """
    tensors, meta = read(path, input_name)
    name = os.path.basename(path)
    mace = meta.get("mace_format_version")
    if mace is not None and mace != FORMAT_VERSION:
        raise MaceInputError(input_name, f"'{name}' was written by MACE file format {mace}; this pack reads "
                                         f"format {FORMAT_VERSION}.", "Update the pack or save the LoRA again.")
    if meta.get("mace_kind") == "erasure" and not concept:
        raise MaceInputError(input_name, f"'{name}' is a MACE erasure of several concepts, not one concept's LoRA.",
                             "Load it with LoraLoader, or write 'file => concept' to fuse it as one concept.")
    concept = concept or meta.get("mace_concept", "")
    if not concept:
        raise MaceInputError(input_name, f"'{name}' does not say which concept it erases.",
                             f"Write '{name} => concept name' on its line.")
    anchor = anchor or meta.get("mace_anchor", "")
    concept_type = concept_type or meta.get(META_CONCEPT_TYPE, "")
    parsed = parse_lora(tensors, shapes, key_map or default_key_map(shapes), path, input_name)
    try:
        steps = int(meta.get("mace_steps", "0") or 0)
    except ValueError:
        steps = 0
    alpha_hint = _UNSET
    if "mace_alpha" in meta:
        alpha_hint = None if meta["mace_alpha"] == "" else float(meta["mace_alpha"])
    extra = {}
    if meta.get("mace_meta"):
        try:
            extra = json.loads(meta["mace_meta"])
        except ValueError:
            extra = {}
    lora = to_concept_lora(parsed, concept, anchor, concept_type, extra, steps, alpha_hint)
    log.info("MACE: loaded '%s' as the LoRA for '%s' (%d matrices, rank %d)", name, concept, len(lora.up), lora.rank)
    return lora, meta.get("mace_base_model", "")
