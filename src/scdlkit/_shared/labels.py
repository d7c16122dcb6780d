"""Label columns: missing values (and strings spelling them) mean "unlabelled", never a class
called "nan"."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "UNKNOWN_LABEL",
    "EncodedLabels",
    "encode_labels",
    "read_batch_column",
    "require_classes",
    "read_label_column",
]

#: The label of cells the model does not label (under a threshold, without a one-class set, or
#: without expression); one definition for the runner, the tools and the slots.
UNKNOWN_LABEL = "Unknown"


@dataclass(frozen=True)
class EncodedLabels:
    """Integer codes (-1 = unlabelled) and the categories they index."""

    codes: np.ndarray
    categories: list[str]

    @property
    def labelled(self) -> np.ndarray:
        return self.codes >= 0

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.codes[self.labelled], minlength=len(self.categories))
        return dict(zip(self.categories, counts.tolist(), strict=True))


def read_label_column(obs: pd.DataFrame, label_key: str) -> pd.Series:
    """``obs[label_key]``, or a KeyError naming the available columns."""
    if label_key not in obs.columns:
        cols = ", ".join(map(repr, obs.columns[:20])) or "none"
        msg = f"label_key={label_key!r} is not a column of adata.obs (columns: {cols})."
        raise KeyError(msg)
    return obs[label_key]


#: Strings that mean "no label": what ``astype(str)`` makes of NaN, None and pandas' NA, and
#: the spellings of "not available" that spreadsheets write. Compared case-insensitively.
MISSING_LABEL_STRINGS = frozenset({"nan", "none", "<na>", "na", "n/a", "null"})


def _missing(values: pd.Series, *, what: str = "label") -> np.ndarray:
    """Missing values, empty strings and strings that spell "missing" (with a warning)."""
    as_str = values.astype("string").str.strip()
    empty = values.isna() | as_str.fillna("").eq("")
    spelled = ~empty & as_str.str.lower().isin(MISSING_LABEL_STRINGS).fillna(False)
    if spelled.any():
        found = as_str[spelled].value_counts()
        listed = ", ".join(f"{name!r}: {count}" for name, count in found.items())
        msg = (
            f"{int(spelled.sum())} cells have a {what} that spells a missing value ({listed}); "
            "they are treated as unlabelled, not as a class. (astype(str) turns missing values "
            "into such strings: keep them as NaN.)"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return (empty | spelled).to_numpy(dtype=bool)


def encode_labels(
    values: pd.Series, *, categories: list[str] | None = None, min_classes: int = 2
) -> EncodedLabels:
    """Encode a label column; NaN, None, empty strings and strings that spell a missing value
    (``"nan"``, ``"None"``, ``"<NA>"``, ..., with a warning) become -1 (unlabelled).

    Categories keep the column's categorical order when it has one (unused ones dropped), else
    sorted order, so codes are stable across runs. With ``categories`` given (a fitted model's),
    labels outside them are treated as unlabelled.
    """
    missing = _missing(values)
    as_str = values.astype(object).where(~missing, None)
    if categories is None:
        present = set(as_str[~missing].astype(str))
        if isinstance(values.dtype, pd.CategoricalDtype):
            categories = [str(c) for c in values.cat.categories if str(c) in present]
        else:
            categories = sorted(present)
        require_classes(categories, min_classes)
    lookup: dict[Any, int] = {c: i for i, c in enumerate(categories)}
    codes = np.array(
        [-1 if m else lookup.get(str(v), -1) for v, m in zip(as_str, missing, strict=True)],
        dtype=np.int64,
    )
    return EncodedLabels(codes=codes, categories=list(categories))


def require_classes(categories: list[str], min_classes: int = 2) -> None:
    """Refuse a label column with fewer than ``min_classes`` labelled classes."""
    if len(categories) < min_classes:
        msg = (
            f"the label column has {len(categories)} labelled class(es) "
            f"({', '.join(categories) or 'none'}); at least {min_classes} are needed to "
            "train a classifier. Check label_key, or label more cells."
        )
        raise ValueError(msg)


def read_batch_column(obs: pd.DataFrame, batch_key: str) -> np.ndarray:
    """``obs[batch_key]`` as strings; a missing column or missing values are errors."""
    if batch_key not in obs.columns:
        cols = ", ".join(map(repr, obs.columns[:20])) or "none"
        msg = f"batch_key={batch_key!r} is not a column of adata.obs (columns: {cols})."
        raise KeyError(msg)
    values = obs[batch_key]
    missing = _missing(values, what="batch")
    if missing.any():
        msg = (
            f"batch_key={batch_key!r}: {int(missing.sum())} cells have no batch (NaN/None/empty). "
            "Every cell needs one: fill them (e.g. 'unknown') or drop those cells."
        )
        raise ValueError(msg)
    return values.astype(str).to_numpy(dtype=object)
