"""Collects the node classes of every node module into the pack's ComfyUI extension."""

import importlib

from comfy_api.latest import ComfyExtension

MODULES = ["refine", "train", "loras", "fuse", "erasure", "concept_world", "erase", "check", "attention_map"]


def all_nodes() -> list:
    found = []
    for name in MODULES:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"nodes.{name}"):
                continue  # this node family is not part of the build
            raise
        found += list(getattr(mod, "NODES", []))
    return found


class MaceExtension(ComfyExtension):
    async def get_node_list(self):
        return all_nodes()
