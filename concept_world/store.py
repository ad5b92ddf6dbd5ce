"""Saving and loading a trained world: one safetensors file per (version, preset, seed) under ComfyUI's models folder.

Keys are grouped by prefix ("unet.", "clip.", "vae.", "classifier."); the metadata holds the spec, configs and
measured figures as JSON. Files are written to a temporary name and renamed, and training is serialised by a
lock file, so parallel test processes never read half a file or train the same world twice.
"""

import contextlib
import fcntl
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "mace-concept-world"
# bump whenever training, rendering or the spec change: old files are then ignored, never loaded
VERSION = 6
# the SDXL-architecture world has its own count, so a change to one family's recipe leaves the other's files valid
SDXL_VERSION = 2  # v2: CLIP-G 64 wide (v1: 32)
VERSIONS = {"sd15": VERSION, "sdxl": SDXL_VERSION}
GROUPS = ("unet", "clip", "vae", "classifier")


def default_dir():
    import folder_paths

    return os.path.join(folder_paths.models_dir, "mace_world")


def world_path(seed: int, preset: str = "full", directory=None, text_width=None, family: str = "sd15"):
    directory = default_dir() if directory is None else str(directory)
    width = f"_text{int(text_width)}" if text_width else ""  # None: the default width, the file name it always had
    if family == "sd15":  # the name SD1.5 worlds always had
        return os.path.join(directory, f"concept_world_v{VERSION}_{preset}{width}_seed{int(seed)}.safetensors")
    if family not in VERSIONS:
        raise ValueError(f"unknown world family {family!r}; one of {', '.join(VERSIONS)}")
    return os.path.join(directory,
                        f"concept_world_{family}_v{VERSIONS[family]}_{preset}{width}_seed{int(seed)}.safetensors")


@contextlib.contextmanager
def locked(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save(path, groups: dict, meta: dict):
    """meta["family"] (default "sd15") decides the version written."""
    tensors = {}
    for group, sd in groups.items():
        assert group in GROUPS, group
        for k, v in sd.items():
            tensors[f"{group}.{k}"] = v.detach().to("cpu").contiguous().clone()
    metadata = {"format": FORMAT, "version": str(VERSIONS[meta.get("family", "sd15")])}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load(path):
    """(groups: {group: state_dict}, meta: dict) from a world file; raises ValueError on a foreign or stale file."""
    groups = {g: {} for g in GROUPS}
    with safe_open(path, framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        family = json.loads(raw.get("family", '"sd15"'))  # SD1.5 files from before the SDXL world carry no family
        want = VERSIONS.get(family)
        if raw.get("format") != FORMAT or want is None or raw.get("version") != str(want):
            raise ValueError(f"{path}: not a concept world file of the current version ({family} v{want})")
        for key in f.keys():
            group, _, name = key.partition(".")
            groups[group][name] = f.get_tensor(key)
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
    return groups, meta


def state_dict_f32(module):
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in module.state_dict().items()}
