"""Argument checks run before any work, and the tables that say which check each argument gets.

Every entry point keeps one table ``{argument: check}``; a check is ``check(name, value)``, which
returns the value in its canonical type or raises a TypeError (wrong type) or ValueError (wrong
value) naming the argument. The checks are those of :mod:`scdlkit._shared.arguments` (bound to
their bounds with :func:`functools.partial`) and the few below. The same tables drive the
property-based tests, so an argument without a check fails a test.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from scdlkit._shared.arguments import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_optional_int,
    check_optional_number,
)
from scdlkit._shared.hardware import resolve_device
from scdlkit.training._schedule import MONITORS, OPTIMIZERS

__all__ = [
    "FRACTION",
    "ArgumentTypeError",
    "SEED",
    "TRAINER_ARGUMENTS",
    "TRAINING_SETTINGS",
    "Check",
    "check_adata",
    "check_arguments",
    "check_dataset",
    "check_device",
    "check_none_or",
    "check_optional_path",
    "check_optional_text",
    "check_path",
    "check_text",
    "check_warmup",
    "optional",
]

#: ``check(name, value) -> canonical value``; raises TypeError or ValueError naming ``name``.
Check = Callable[[str, Any], Any]

#: Seeds reach numpy and Lightning's ``seed_everything``, which take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
TASKS = ("classification", "representation")
CLASS_WEIGHTS = (None, "balanced")
_DEVICE_HINT = "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError as these arguments raised
    before their types were checked (so ``except ValueError`` and the command line's exit code 2
    still catch it)."""


def check_arguments(table: Mapping[str, Check], arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument through its check in ``table``; the canonical values, by name.

    An argument missing from ``table`` is a bug of the entry point (a new argument without a
    check), never accepted unchecked. A wrong type raises :class:`ArgumentTypeError`.
    """
    unchecked = sorted(set(arguments) - set(table))
    if unchecked:
        msg = f"no argument check for {unchecked}: add them to the entry point's table."
        raise RuntimeError(msg)
    checked = {}
    for name, value in arguments.items():
        try:
            checked[name] = table[name](name, value)
        except ArgumentTypeError:
            raise
        except TypeError as err:
            raise ArgumentTypeError(str(err)) from None
    return checked


def check_none_or(name: str, value: Any, *, check: Check) -> Any:
    """``None``, or ``value`` through ``check``."""
    return None if value is None else check(name, value)


def optional(check: Check) -> Check:
    """``check`` that also accepts ``None``."""
    return partial(check_none_or, check=check)


def check_text(name: str, value: Any) -> str:
    """A non-empty string (a key, a name)."""
    if not isinstance(value, str):
        msg = f"{name} must be a string, got {_got(value)}."
        raise TypeError(msg)
    if not value:
        msg = f"{name} must not be an empty string."
        raise ValueError(msg)
    return value


def check_optional_text(name: str, value: Any) -> str | None:
    """:func:`check_text`, with ``None`` passed through."""
    return None if value is None else check_text(name, value)


def check_path(name: str, value: Any) -> str | os.PathLike:
    """A file or folder path: a non-empty string or an :class:`os.PathLike`."""
    if isinstance(value, os.PathLike):
        return value
    if "\0" in check_text(name, value):
        msg = f"{name}={value!r} holds a NUL character, which no file system takes in a path."
        raise ValueError(msg)
    return value


def check_optional_path(name: str, value: Any) -> str | os.PathLike | None:
    """:func:`check_path`, with ``None`` passed through."""
    return None if value is None else check_path(name, value)


def check_adata(name: str, value: Any) -> Any:
    """An :class:`~anndata.AnnData` (in memory, backed, or a view)."""
    from anndata import AnnData

    if not isinstance(value, AnnData):
        msg = f"{name} must be an AnnData, got {type(value).__name__}."
        raise TypeError(msg)
    return value


def check_device(name: str, value: Any) -> str | torch.device:
    """``"auto"``, a torch device string or :class:`torch.device` that this machine has."""
    if not isinstance(value, str | torch.device):
        msg = f"{name} must be a device string such as 'cpu', got {_got(value)}; {_DEVICE_HINT}."
        raise TypeError(msg)
    if value == "auto":
        return value
    try:
        device = resolve_device(value)
    except (RuntimeError, ValueError) as err:
        msg = f"{name}={value!r} is not a device that torch knows; {_DEVICE_HINT}."
        raise ValueError(msg) from err
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index is not None and device.index >= n):
            msg = f"{name}={value!r}: this machine has {n} CUDA GPU(s); use 'cpu' or 'auto'."
            raise ValueError(msg)
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            msg = f"{name}={value!r}: Apple MPS is not available here; use 'cpu' or 'auto'."
            raise ValueError(msg)
    return value


def check_warmup(name: str, value: Any) -> int | float:
    """A number of warm-up steps (an integer >= 0) or a fraction of all steps in ``[0, 1)``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return check_int(name, value, min_value=0)
    value = check_number(name, value, min_value=0)
    if value >= 1:
        msg = (
            f"{name}={value!r}: a float is a fraction of all steps and must be in [0, 1); pass "
            "an integer for a number of steps."
        )
        raise ValueError(msg)
    return value


def check_module(name: str, value: Any) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        msg = f"{name} must be a torch.nn.Module, got {type(value).__name__}."
        raise TypeError(msg)
    return value


def check_precision(name: str, value: Any) -> str | int:
    """A precision name (``"auto"``, ``"fp32"``, ``"bf16"`` or a Fabric one such as ``32``);
    Lightning Fabric, built in the constructor, refuses names it does not know."""
    if isinstance(value, bool) or not isinstance(value, str | numbers.Integral):
        msg = f"{name} must be a precision name such as 'auto' or 'fp32', got {_got(value)}."
        raise TypeError(msg)
    return int(value) if isinstance(value, numbers.Integral) else check_text(name, value)


def check_fabric_option(name: str, value: Any) -> Any:
    """``accelerator``, ``devices``, ``strategy``: Lightning Fabric, built in the constructor
    before any work, checks them and names them in its errors."""
    return value


def check_dataset(dataset: Any, name: str) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        msg = f"`{name}` must be a map-style dataset with __len__ and __getitem__."
        raise TypeError(msg)
    if len(dataset) == 0:
        msg = f"`{name}` is empty; pass a dataset with at least one cell."
        raise ValueError(msg)


POSITIVE_INT = partial(check_int, min_value=1)
POSITIVE = partial(check_number, min_value=0, min_inclusive=False)
#: A share of cells held out: in ``[0, 1)``.
FRACTION = partial(check_number, min_value=0, max_value=1, max_inclusive=False)
SEED = partial(check_int, min_value=0, max_value=MAX_SEED)

#: The training settings shared by the Trainer's arguments and the runners' ``training=``.
TRAINING_SETTINGS: dict[str, Check] = {
    "epochs": POSITIVE_INT,
    "max_steps": partial(check_optional_int, min_value=1),
    "eval_every": partial(check_optional_int, min_value=1),
    "lr": POSITIVE,
    "head_lr": partial(check_optional_number, min_value=0, min_inclusive=False),
    "weight_decay": partial(check_number, min_value=0),
    "optimizer": partial(check_choice, choices=tuple(OPTIMIZERS)),
    "adam_eps": POSITIVE,
    "warmup": check_warmup,
    "lr_decay": partial(check_optional_number, min_value=0, min_inclusive=False, max_value=1),
    "grad_clip": partial(check_optional_number, min_value=0, min_inclusive=False),
    "early_stopping_patience": partial(check_optional_int, min_value=1),
    "monitor": partial(check_choice, choices=tuple(MONITORS)),
    "class_weight": partial(check_choice, choices=CLASS_WEIGHTS),
}

#: Every argument of :class:`~scdlkit.training.Trainer`.
TRAINER_ARGUMENTS: dict[str, Check] = {
    "model": check_module,
    "task": partial(check_choice, choices=TASKS),
    "batch_size": POSITIVE_INT,
    **TRAINING_SETTINGS,
    "precision": check_precision,
    "accelerator": check_fabric_option,
    "devices": check_fabric_option,
    "strategy": check_fabric_option,
    "num_nodes": POSITIVE_INT,
    "seed": SEED,
    "num_threads": partial(check_optional_int, min_value=1),
    "progress": check_bool,
    "keep": partial(check_choice, choices=("best", "last")),
}
