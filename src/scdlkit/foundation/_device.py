"""Device and numeric precision choices shared by embedding, prediction and training."""

from __future__ import annotations

import contextlib

import torch

from scdlkit._shared.hardware import native_bf16, resolve_device

__all__ = ["autocast_context", "native_bf16", "resolve_device", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"``: ``"auto"`` is bf16 where :func:`native_bf16` says so."""
    if precision not in PRECISIONS:
        msg = f"precision={precision!r}; choose 'auto', 'fp32' or 'bf16'."
        raise ValueError(msg)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_context(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast when the resolved precision is bf16; a no-op context for fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
