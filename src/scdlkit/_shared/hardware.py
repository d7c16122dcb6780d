"""The default device, and whether a device runs bfloat16 natively (inference and Trainer)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["native_bf16", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


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
