"""bf16 autocast only on a CPU with bf16 instructions: an AVX2-only CPU emulates bf16 about 10-20x slower, which
turned the concept world's first run into hours. The kernels' ISA is limited with ATEN_CPU_CAPABILITY (as on such a
CPU), in a fresh interpreter, since torch reads it once at import."""

import subprocess
import sys
from pathlib import Path

import torch

CPU_PY = Path(__file__).resolve().parents[2] / "concept_world" / "cpu.py"
PROBE = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("cpu_probe", {str(CPU_PY)!r})
cpu = importlib.util.module_from_spec(spec); spec.loader.exec_module(cpu)
with cpu.autocast():
    y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
print(cpu.native_bf16(), y.dtype)
print(cpu.describe())
"""


def probe(**env):
    import os

    full = {k: v for k, v in os.environ.items() if k not in ("MACE_CPU_BF16", "ATEN_CPU_CAPABILITY")} | env
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    first, reason = out.stdout.splitlines()
    return first.split() + [reason]


def test_avx2_kernels_train_in_float32():
    assert probe(ATEN_CPU_CAPABILITY="avx2") == ["False", "torch.float32", "float32 (no native bf16 on this CPU)"]


def test_override_forces_either_way():
    # the training log says why: a forced float32 on a bf16 machine must not read as "no native bf16"
    assert probe(MACE_CPU_BF16="0") == ["False", "torch.float32", "float32 (MACE_CPU_BF16=0)"]
    assert probe(MACE_CPU_BF16="1") == ["True", "torch.bfloat16", "bf16 autocast (MACE_CPU_BF16=1)"]


def test_default_follows_the_hardware():
    has = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
               getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    has = has and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    assert probe() == [str(has), "torch.bfloat16" if has else "torch.float32",
                       "bf16 autocast (native bf16)" if has else "float32 (no native bf16 on this CPU)"]
