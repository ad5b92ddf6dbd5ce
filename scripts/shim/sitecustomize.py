"""Lets a ComfyUI server start beside a CPU-only torch with no importable torchvision.

ComfyUI core imports torchvision for model families this pack does not use. When the real one imports, nothing
happens here; otherwise empty modules stand in (with a __spec__, which transformers' find_spec needs).
"""

import importlib.machinery
import sys
import types

try:
    import torchvision  # noqa: F401
except Exception:
    for _name in ("torchvision", "torchvision.transforms"):
        _mod = types.ModuleType(_name)
        _mod.__spec__ = importlib.machinery.ModuleSpec(_name, None)
        _mod.__path__ = []
        sys.modules[_name] = _mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
