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


@functools.cache
def native_bf16() -> bool:
    """True where torch reports bf16 instructions (AVX-512 BF16 or AMX). MACE_CPU_BF16=0/1 overrides, to measure
    the float32 path on a bf16 machine."""
    forced = os.environ.get("MACE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
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
    forced = os.environ.get("MACE_CPU_BF16") in ("0", "1")
    if native_bf16():
        return "bf16 autocast (MACE_CPU_BF16=1)" if forced else "bf16 autocast (native bf16)"
    return "float32 (MACE_CPU_BF16=0)" if forced else "float32 (no native bf16 on this CPU)"
