"""Argument checks with messages that name the argument and the fix."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_dataset", "check_int", "check_number", "check_warmup", "is_number"]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"`{name}` must be an integer >= {minimum}; got {value!r}."
        raise ValueError(msg)


def check_number(value: Any, name: str, *, positive: bool, hint: str = "") -> None:
    ok = is_number(value) and (value > 0 if positive else value >= 0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        hint = f" {hint}" if hint else ""
        msg = f"`{name}` must be a finite number {bound}{hint}; got {value!r}."
        raise ValueError(msg)


def check_warmup(warmup: Any) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int | float):
        msg = f"`warmup` must be a fraction in [0, 1) or a number of steps; got {warmup!r}."
        raise ValueError(msg)
    if isinstance(warmup, int) and warmup < 0:
        msg = f"`warmup`={warmup} steps must be >= 0."
        raise ValueError(msg)
    if isinstance(warmup, float) and not (0.0 <= warmup < 1.0):
        msg = (
            f"`warmup`={warmup!r}: a float is a fraction of all steps and must be in [0, 1); "
            "pass an int for a number of steps."
        )
        raise ValueError(msg)


def check_dataset(dataset: Any, name: str) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        msg = f"`{name}` must be a map-style dataset with __len__ and __getitem__."
        raise TypeError(msg)
    if len(dataset) == 0:
        msg = f"`{name}` is empty; pass a dataset with at least one cell."
        raise ValueError(msg)
