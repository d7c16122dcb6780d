"""The default device, and whether a device runs bfloat16 natively (inference and Trainer)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["NATIVE_BF16_ENV", "native_bf16", "resolve_device"]

#: Environment variable that overrides the CPU check of :func:`native_bf16`: ``"1"`` makes
#: ``precision="auto"`` pick bf16 on any CPU, ``"0"`` makes it pick fp32; unset or empty reads
#: the CPU flags.
NATIVE_BF16_ENV = "SCDLKIT_NATIVE_BF16"


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
    For CPUs, the environment variable ``SCDLKIT_NATIVE_BF16`` set to ``1`` or ``0`` overrides
    the check (to test or pin what ``precision="auto"`` picks).

    Raises
    ------
    ValueError
        ``SCDLKIT_NATIVE_BF16`` is set to something other than ``0``, ``1`` or empty.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and _cuda_bf16()
    if kind == "cpu":
        forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
        if forced in {"0", "1"}:
            return forced == "1"
        if forced:
            msg = f"{NATIVE_BF16_ENV}={forced!r}: use 1 (CPU runs bf16 natively), 0 or unset."
            raise ValueError(msg)
        return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())
    return False
