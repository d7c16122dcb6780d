"""Whether a device runs bfloat16 natively; shared by inference and the Trainer."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["native_bf16"]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cuda_bf16() -> bool:
    try:
        # Without emulation: pre-Ampere GPUs report bf16 "supported" but run it slowly.
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the `including_emulation` argument
        return bool(torch.cuda.is_bf16_supported())


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matrix work natively (not emulated).

    CUDA devices that report bf16 support without emulation (Ampere and newer); CPUs with AMX
    or AVX512-BF16 instructions (read from ``/proc/cpuinfo``; ``False`` where it is absent).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and _cuda_bf16()
    if kind == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())
    return False
