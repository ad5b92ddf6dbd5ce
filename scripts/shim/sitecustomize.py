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
    import enum

    for _name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        _mod = types.ModuleType(_name)
        _mod.__spec__ = importlib.machinery.ModuleSpec(_name, None)
        _mod.__path__ = []
        sys.modules[_name] = _mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = _functional = sys.modules["torchvision.transforms.functional"]

    # spandrel (ComfyUI's upscale-model loader) imports these names at import time. Without it ComfyUI drops
    # UpscaleModelLoader, and frontend 1.27 then fails to build every model picker (Load Checkpoint included),
    # because it looks that node up unconditionally. The stand-ins exist; using them is an error.
    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def _unavailable(*_args, **_kwargs):
        raise RuntimeError("torchvision is not installed beside this CPU torch (scripts/shim stand-in)")

    _functional.InterpolationMode = InterpolationMode
    _functional.rotate = _functional.normalize = _unavailable
