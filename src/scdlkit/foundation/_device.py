"""Device and numeric precision choices shared by embedding, prediction and training."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_context", "resolve_device"]


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


def autocast_context(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA under ``"auto"`` (or anywhere under ``"bf16"``); fp32 otherwise."""
    if precision not in {"auto", "fp32", "bf16"}:
        msg = f"precision={precision!r}; choose 'auto', 'fp32' or 'bf16'."
        raise ValueError(msg)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
