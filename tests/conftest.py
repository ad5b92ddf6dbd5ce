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

# Tiny models are latency-bound: one thread avoids OpenMP threads fighting over shared cores (28 small SVDs took
# 10 s with 2 threads and 0.03 s with 1 here). MACE_TEST_THREADS overrides.
import os  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MACE_TEST_THREADS", "1")))
