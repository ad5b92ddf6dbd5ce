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
GROUPS = ("unet", "clip", "vae", "classifier")


def default_dir():
    import folder_paths

    return os.path.join(folder_paths.models_dir, "mace_world")


def world_path(seed: int, preset: str = "full", directory=None, text_width=None):
    directory = default_dir() if directory is None else str(directory)
    width = f"_text{int(text_width)}" if text_width else ""  # None: the default width, the file name it always had
    return os.path.join(directory, f"concept_world_v{VERSION}_{preset}{width}_seed{int(seed)}.safetensors")


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
    tensors = {}
    for group, sd in groups.items():
        assert group in GROUPS, group
        for k, v in sd.items():
            tensors[f"{group}.{k}"] = v.detach().to("cpu").contiguous().clone()
    metadata = {"format": FORMAT, "version": str(VERSION)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def load(path):
    """(groups: {group: state_dict}, meta: dict) from a world file; raises ValueError on a foreign or stale file."""
    groups = {g: {} for g in GROUPS}
    with safe_open(path, framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        if raw.get("format") != FORMAT or raw.get("version") != str(VERSION):
            raise ValueError(f"{path}: not a concept world v{VERSION} file")
        for key in f.keys():
            group, _, name = key.partition(".")
            groups[group][name] = f.get_tensor(key)
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}
    return groups, meta


def state_dict_f32(module):
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in module.state_dict().items()}
