"""Expose mace_core to host-free tests by path, under its own name only.

The pack root itself must never go on sys.path: its `nodes` package would shadow ComfyUI's `nodes` module.
"""

import importlib.util
import sys
from pathlib import Path

_core = Path(__file__).resolve().parents[1] / "mace_core"
if "mace_core" not in sys.modules:
    spec = importlib.util.spec_from_file_location("mace_core", _core / "__init__.py",
                                                  submodule_search_locations=[str(_core)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mace_core"] = module
    spec.loader.exec_module(module)
