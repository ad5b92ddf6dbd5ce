"""What the CPU does fast: bf16 only where the hardware has it.

A CPU without bf16 instructions (AVX2 only, as on many AMD EPYC and consumer chips) emulates bf16 and runs it about
20x slower than float32, so bf16 autocast there would turn minutes into hours.
"""

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


def _forced() -> bool | None:
    """MACE_CPU_BF16=1 / 0 (bf16 / float32 whatever the CPU), or None: follow the hardware."""
    return {"0": False, "1": True}.get(os.environ.get("MACE_CPU_BF16", ""))


@functools.cache
def native_bf16() -> bool:
    """True where torch reports bf16 instructions (AVX-512 BF16 or AMX). MACE_CPU_BF16=0/1 overrides, to measure
    the float32 path on a bf16 machine."""
    forced = _forced()
    if forced is not None:
        return forced
    try:  # kernels limited to AVX2 (ATEN_CPU_CAPABILITY=avx2, or the hardware) run bf16 emulated
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            return False
    except Exception:
        pass
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private probe that changed: fall back to float32, which is always right
            pass
    return False


def autocast():
    """bf16 autocast on a CPU that has bf16, float32 (no autocast) on one that does not."""
    if native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe() -> str:
    what = "bf16 autocast" if native_bf16() else "float32"
    if _forced() is not None:  # the log must not blame the CPU for a precision that was asked for
        return f"{what} (MACE_CPU_BF16={int(native_bf16())})"
    return f"{what} (native bf16)" if native_bf16() else f"{what} (no native bf16 on this CPU)"
