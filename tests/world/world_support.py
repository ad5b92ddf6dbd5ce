"""Helpers for the concept-world tests (a module with its own name: other test folders have a conftest too)."""

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
import comfy_host  # noqa: E402

PACKAGE = "mace_pack_world_tests"


def pack_import(name):
    """Import <pack>/<name> inside a package named unlike the folder (ComfyUI derives it from the path), so every
    import in the pack must be relative; the pack's own __init__ is not run (other parts may be mid-work), and
    the pack root never goes on sys.path (its nodes/ would shadow ComfyUI's nodes module)."""
    if PACKAGE not in sys.modules:
        mod = types.ModuleType(PACKAGE)
        mod.__path__ = [str(comfy_host.PACK)]
        mod.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        mod.__spec__.submodule_search_locations = [str(comfy_host.PACK)]
        sys.modules[PACKAGE] = mod
    return importlib.import_module(f"{PACKAGE}.{name}")
