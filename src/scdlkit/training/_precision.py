"""Turn the Trainer's ``precision`` and ``devices`` shorthands into Lightning Fabric settings."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["resolve_devices", "resolve_precision"]

_ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
_CPU_LIKE = {"cpu", "mps", "tpu"}


def _bf16_supported() -> bool:
    try:
        # Without emulation: pre-Ampere GPUs report bf16 "supported" but run it slowly.
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the `including_emulation` argument
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str | int = "auto", *, accelerator: Any = "auto") -> str:
    """Resolve the Trainer's ``precision`` argument to a Lightning Fabric precision string.

    Parameters
    ----------
    precision
        ``"auto"`` picks ``"bf16-mixed"`` when the run will use a CUDA GPU that supports
        bfloat16 natively, and ``"32-true"`` otherwise. ``"fp32"`` means ``"32-true"``,
        ``"bf16"`` means ``"bf16-mixed"``, ``"fp16"`` means ``"16-mixed"``; any other value is
        passed to Fabric unchanged (e.g. ``"16-mixed"``, ``"bf16-true"``).
    accelerator
        The Trainer's ``accelerator``; with ``"cpu"`` or ``"mps"``, ``"auto"`` stays fp32.

    Returns
    -------
    str
        A precision string Fabric accepts.

    Examples
    --------
    >>> from scdlkit.training import resolve_precision
    >>> resolve_precision("fp32")
    '32-true'
    >>> resolve_precision("auto", accelerator="cpu")
    '32-true'
    """
    if isinstance(precision, int) and not isinstance(precision, bool):
        precision = str(precision)
    if not isinstance(precision, str):
        msg = f"`precision` must be a string such as 'auto', 'fp32' or 'bf16'; got {precision!r}."
        raise ValueError(msg)
    if precision != "auto":
        return _ALIASES.get(precision, precision)
    name = accelerator.lower() if isinstance(accelerator, str) else "auto"
    if name in _CPU_LIKE:
        return "32-true"
    if torch.cuda.is_available() and _bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_devices(devices: Any, *, strategy: Any, num_nodes: int) -> Any:
    """One device unless a distributed run is asked for.

    Fabric's ``devices="auto"`` takes every visible GPU and then re-launches the calling script
    once per GPU; inside a notebook or a scanpy pipeline that is a surprise, so ``"auto"`` with
    ``strategy="auto"`` on one node means a single device here.

    Parameters
    ----------
    devices
        The Trainer's ``devices``.
    strategy
        The Trainer's ``strategy``.
    num_nodes
        The Trainer's ``num_nodes``.

    Returns
    -------
    Any
        The value to give Fabric.

    Examples
    --------
    >>> from scdlkit.training._precision import resolve_devices
    >>> resolve_devices("auto", strategy="auto", num_nodes=1)
    1
    >>> resolve_devices("auto", strategy="ddp", num_nodes=1)
    'auto'
    """
    if devices == "auto" and strategy == "auto" and num_nodes == 1:
        return 1
    return devices
