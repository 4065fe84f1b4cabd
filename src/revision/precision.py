"""The arithmetic a stage computes in: fp32 (``no``), bf16 autocast, fp16 (GPUs), or ``auto``.

``auto`` picks bf16 where the hardware multiplies bf16 natively: a CPU with AVX-512 BF16 (AMD Zen 4 and later,
Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later), or a GPU that supports it; fp32 anywhere else,
because a CPU without those instructions emulates bf16 and runs many times slower than in fp32. Weights stay
fp32 either way: autocast runs the matrix products in bf16 and keeps reductions, softmax and losses in fp32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch

from revision.config import MixedPrecision

Precision = Literal["no", "bf16", "fp16"]  # what a stage computes in: params' MixedPrecision once auto is resolved
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the instructions that multiply bf16
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; empty where there is no /proc/cpuinfo (other systems)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))
    return False


def resolve(requested: MixedPrecision, device: torch.device | str) -> Precision:
    """What a stage computes in on ``device``: ``auto`` becomes bf16 where it is native, else ``no`` (fp32)."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "no"
    return requested


def autocast(precision: Precision, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at ``precision`` (nothing for fp32)."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def default_device() -> torch.device:
    """The device a stage runs on: the GPU where there is one, unless the launch forces the CPU as Accelerate
    does (ACCELERATE_USE_CPU). Read from the environment: creating Accelerate's state here, before the stage's
    Accelerator, would fix it without the launch's CPU setting (every rank would think it is the only one)."""
    from accelerate.utils import parse_flag_from_env

    return torch.device("cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu")
