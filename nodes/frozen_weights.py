"""The UNet weights a training step does not train: cut from autograd, and remade in backward instead of kept.

A linear or convolution layer's backward needs its weight. Under ComfyUI's weight wrappers the weight a layer
computes with is a fresh copy of the stored one (in float32 when an fp16/bf16/fp8 model computes in float32, as
training does), and autograd would keep every such copy until backward: a second, float32 UNet, about 10 GB for SDXL
and 3 GB for SD1.5, beside the stored weights. WeightCopies notes where each copy came from; while a step's forward
runs under WeightCopies.saving(), autograd keeps that note in the copy's place and remakes the copy when the layer's
backward needs it (the same cast of the same stored weight, so the same tensor, bit for bit). A copy is remade only
where one check showed the cast reproduces it exactly and no other wrapper (ComfyUI's low-VRAM patches) changes it;
anything else is kept as autograd would keep it.
"""

import weakref
from contextlib import contextmanager

import comfy.model_management as mm
import torch


class DetachedWeight:
    """Weight wrapper for every weight that is not trained: ComfyUI hands wrappers a fresh copy of the weight; cutting
    its autograd link keeps backward from ever reaching the shared module's parameters (which may be inference
    tensors from the executor, or require grad). With `copies` and the module, it also notes the copy there."""

    def __init__(self, copies: "WeightCopies | None" = None, module: torch.nn.Module | None = None):
        self.copies, self.module = copies, module

    def __call__(self, w):
        w = w.detach()
        if self.copies is not None:
            self.copies.note(w, self.module)
        return w


class _Remake:
    """What autograd keeps in place of a weight copy (or a view of one): the module and the view's layout."""

    __slots__ = ("module", "dtype", "device", "size", "stride", "offset")

    def __init__(self, module, t):
        self.module, self.dtype, self.device = module, t.dtype, t.device
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def tensor(self):
        w = _cast(self.module, self.dtype, self.device)
        return w.as_strided(self.size, self.stride, self.offset)


def _cast(module, dtype, device):
    # what comfy.ops.cast_bias_weight does before it calls the wrappers: the stored weight, copied to dtype and device
    return mm.cast_to(module.weight, dtype, device, copy=True).detach()


class WeightCopies:
    def __init__(self):
        self.enabled = True
        self._notes: dict[int, tuple] = {}  # copy's storage address -> (weak ref to the copy, module)
        self._exact: dict[int, bool] = {}  # id(module) -> does its cast reproduce the copy bit for bit
        self.kept_bytes = self.remade_bytes = 0  # over the last saving() block, unique storages
        self._seen: set = set()

    def note(self, w: torch.Tensor, module: torch.nn.Module):
        if not self._active or len(getattr(module, "weight_function", ())) != 1 or not w.is_contiguous():
            return  # another wrapper (a low-VRAM patch) changes the copy: keep it
        exact = self._exact.get(id(module))
        if exact is None:
            exact = self._exact[id(module)] = bool(torch.equal(_cast(module, w.dtype, w.device), w))
        if exact:
            self._notes[w.untyped_storage().data_ptr()] = (weakref.ref(w), module)

    _active = False

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        key = storage.data_ptr()
        found = self._notes.get(key)
        # the noted copy still alive means its storage cannot have been reused: t is the copy or a view of it
        if found is not None and found[0]() is not None and found[0]().dtype == t.dtype:
            # counted once per module: a remade copy is freed after its layer, and its address reused
            if ("module", id(found[1])) not in self._seen:
                self._seen.add(("module", id(found[1])))
                self.remade_bytes += storage.nbytes()
            return _Remake(found[1], t)
        if key not in self._seen:  # autograd holds what it keeps: no other storage reuses this address meanwhile
            self._seen.add(key)
            self.kept_bytes += storage.nbytes()
        return t

    @staticmethod
    def _unpack(p):
        return p.tensor() if isinstance(p, _Remake) else p

    @contextmanager
    def saving(self):
        """Run a forward whose backward remakes the noted weight copies (with enabled False, keeps them as autograd
        would). Either way kept_bytes then says what autograd kept for backward: a step's activation memory."""
        self.kept_bytes = self.remade_bytes = 0
        self._seen = set()
        self._active = self.enabled
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._active = False
            self._notes.clear()
            self._seen = set()
