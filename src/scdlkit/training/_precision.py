"""Turn the Trainer's ``precision`` and ``devices`` shorthands into Lightning Fabric settings."""

from __future__ import annotations

from typing import Any

from scdlkit._shared.hardware import native_bf16, resolve_device

__all__ = ["resolve_devices", "resolve_precision"]

_ALIASES = {"fp32": "32-true", "32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def resolve_precision(precision: str | int = "auto", *, accelerator: Any = "auto") -> str:
    """Resolve the Trainer's ``precision`` argument to a Lightning Fabric precision string.

    Parameters
    ----------
    precision
        ``"auto"`` picks ``"bf16-mixed"`` where the run's device has native bfloat16 (CUDA GPUs
        from Ampere on; CPUs with AMX or AVX512-BF16), and ``"32-true"`` otherwise.
        ``"fp32"`` means ``"32-true"``, ``"bf16"`` means ``"bf16-mixed"``, ``"fp16"`` means
        ``"16-mixed"``; any other value is passed to Fabric unchanged (e.g. ``"bf16-true"``).
    accelerator
        The Trainer's ``accelerator``; ``"auto"`` is resolved as Fabric does (CUDA, then MPS,
        then CPU). MPS and other accelerators stay fp32.

    Returns
    -------
    str
        A precision string Fabric accepts.

    Examples
    --------
    >>> from scdlkit.training import resolve_precision
    >>> resolve_precision("fp32")
    '32-true'
    >>> resolve_precision("auto", accelerator="mps")
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
    if name == "auto":  # as Fabric picks: CUDA, then MPS, then CPU
        name = resolve_device("auto").type
    if name in {"cuda", "gpu", "cpu"}:
        return "bf16-mixed" if native_bf16("cuda" if name == "gpu" else name) else "32-true"
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
