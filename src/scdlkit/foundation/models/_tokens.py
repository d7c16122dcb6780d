"""What every model's token store shares: CSR-like stores of cells joined chunk by chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ["concat_stores"]

Store = TypeVar("Store")


def concat_stores(
    parts: Sequence[Store], *, per_token: Sequence[str], per_cell: Sequence[str] = ()
) -> Store:
    """Token stores of consecutive row ranges joined into one, in order.

    Each store is a dataclass with an ``indptr`` (``n_cells + 1`` offsets) into its
    ``per_token`` arrays; ``per_cell`` arrays hold one entry per cell. Every other field is
    taken from the first part.
    """
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, starts, strict=True)])
    joined: dict[str, Any] = {
        name: np.concatenate([getattr(p, name) for p in parts]) for name in (*per_token, *per_cell)
    }
    return dataclasses.replace(parts[0], indptr=indptr.astype(np.int64), **joined)
