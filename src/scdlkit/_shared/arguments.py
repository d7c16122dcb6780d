"""Type and range checks for the arguments of every entry point, run before any work.

Each check names the argument, what it got and what it accepts, and returns the value in its
canonical Python type (numpy integers and floats are accepted where Python ones are, as numpy
users expect; a bool is never taken for a number, a string never for a number).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_optional_int",
    "check_optional_number",
]


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; only ``True``/``False`` (and numpy's) are accepted."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    msg = f"{name} must be True or False, got {_got(value)}."
    raise TypeError(msg)


def check_int(
    name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None
) -> int:
    """``value`` as an ``int`` within ``[min_value, max_value]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            msg = f"{name} must be a whole number, got {_got(value)}."
        else:
            msg = f"{name} must be an integer, got {_got(value)}."
        raise TypeError(msg)
    value = int(value)
    if min_value is not None and value < min_value:
        msg = f"{name} must be at least {min_value}, got {value}."
        raise ValueError(msg)
    if max_value is not None and value > max_value:
        msg = f"{name} must be at most {max_value}, got {value}."
        raise ValueError(msg)
    return value


def check_optional_int(name: str, value: Any, **bounds: int | None) -> int | None:
    """:func:`check_int`, with ``None`` passed through."""
    return None if value is None else check_int(name, value, **bounds)


def check_number(
    name: str,
    value: Any,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """``value`` as a finite ``float`` within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number, got {_got(value)}."
        raise TypeError(msg)
    value = float(value)
    if not math.isfinite(value):
        msg = f"{name} must be a finite number, got {value}."
        raise ValueError(msg)
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        bound = "at least" if min_inclusive else "greater than"
        msg = f"{name} must be {bound} {min_value}, got {value}."
        raise ValueError(msg)
    if max_value is not None and (value > max_value or (not max_inclusive and value == max_value)):
        bound = "at most" if max_inclusive else "less than"
        msg = f"{name} must be {bound} {max_value}, got {value}."
        raise ValueError(msg)
    return value


def check_optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """:func:`check_number`, with ``None`` passed through."""
    return None if value is None else check_number(name, value, **bounds)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    try:
        ok = bool(value in choices)
    except (TypeError, ValueError):  # unhashable against a set; an array's ambiguous truth
        ok = False
    if not ok:
        listed = ", ".join(map(repr, choices))
        msg = f"{name}={value!r} is not one of {listed}."
        raise ValueError(msg)
    return value
