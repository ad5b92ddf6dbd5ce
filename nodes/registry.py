"""Collects the node classes of every node module; a module that fails to import is logged, not fatal."""

import importlib
import logging

log = logging.getLogger("MACE")

MODULES = ["refine", "train", "loras", "fuse", "erasure", "concept_world"]


def all_nodes() -> list:
    found = []
    for name in MODULES:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"nodes.{name}"):
                continue  # module not written yet
            raise
        found += list(getattr(mod, "NODES", []))
    return found
