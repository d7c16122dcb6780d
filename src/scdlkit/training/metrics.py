"""Classification metrics that are always defined, and a converter to strict JSON.

Every function ignores cells whose true label code is ``-1`` (unlabelled). A value that is
undefined for the data at hand (for example AUROC when only one class is present) is ``None``,
never ``NaN``, so results can be written with ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

__all__ = [
    "classification_metrics",
    "confusion_matrix",
    "json_safe",
    "monitor_metrics",
    "per_class_metrics",
]


def _labelled_codes(y_true: Any, *, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        msg = f"`{name}` must be one-dimensional; got shape {y.shape}."
        raise ValueError(msg)
    integral = np.issubdtype(y.dtype, np.integer)
    if y.size and not integral and not (np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0)):
        msg = f"`{name}` must hold integer label codes (-1 for unlabelled)."
        raise ValueError(msg)
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < -1:
        msg = f"`{name}` holds code {int(y.min())}; codes must be >= 0, or -1 for unlabelled."
        raise ValueError(msg)
    return y


def _check_range(y: np.ndarray, n_classes: int, *, name: str) -> None:
    if y.size and y.max() >= n_classes:
        msg = (
            f"`{name}` holds code {int(y.max())} but there are only {n_classes} classes; "
            "pass a larger `n_classes` or fix the label codes."
        )
        raise ValueError(msg)


def _renormalise(probabilities: Any) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2:
        msg = f"`probabilities` must be a 2-D array (cells x classes); got shape {p.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(p)) or (p.size and p.min() < 0):
        msg = "`probabilities` must be finite and non-negative; apply a softmax to logits first."
        raise ValueError(msg)
    sums = p.sum(axis=1, keepdims=True)
    uniform = np.full_like(p, 1.0 / max(p.shape[1], 1))
    return np.where(sums > 0, p / np.where(sums > 0, sums, 1.0), uniform)


def _auroc_ovr(y: np.ndarray, p: np.ndarray) -> float | None:
    present = np.unique(y)
    if present.size < 2:
        return None
    # One-vs-rest over the classes present in `y`; each has >= 1 positive (it is present) and
    # >= 1 negative (another class is present), so every term is finite.
    scores = [skm.roc_auc_score(y == c, p[:, c]) for c in present]
    value = float(np.mean(scores))
    return value if math.isfinite(value) else None


def _labelled_predictions(
    y_true: Any, probabilities: Any, n_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled cells' codes and renormalised probabilities, both checked."""
    y = _labelled_codes(y_true)
    p = _renormalise(probabilities)
    if p.shape[0] != y.shape[0]:
        msg = (
            f"`y_true` has {y.shape[0]} cells but `probabilities` has {p.shape[0]} rows; "
            "pass arrays for the same cells."
        )
        raise ValueError(msg)
    if n_classes is not None and n_classes != p.shape[1]:
        msg = (
            f"`n_classes`={n_classes} but `probabilities` has {p.shape[1]} columns; "
            "pass one column per class."
        )
        raise ValueError(msg)
    _check_range(y, p.shape[1], name="y_true")
    mask = y >= 0
    return y[mask], p[mask]


def classification_metrics(
    y_true: Any, probabilities: Any, *, n_classes: int | None = None
) -> dict[str, float | int | None]:
    """Summary metrics of a classifier's predictions.

    Parameters
    ----------
    y_true
        Integer label codes, shape ``(n,)``; ``-1`` marks unlabelled cells, which are ignored.
    probabilities
        Class scores, shape ``(n, C)``. Rows are renormalised to sum to one, so un-normalised
        non-negative scores are accepted; predictions are the row-wise argmax.
    n_classes
        Number of classes ``C``. Defaults to ``probabilities.shape[1]``; if given it must match.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1``, ``balanced_accuracy``, ``weighted_f1`` and ``auroc_ovr``
        (floats, or ``None`` when there are no labelled cells) and ``n_cells`` (labelled cells
        evaluated). ``macro_f1`` averages over the classes present in the true or predicted
        labels. ``auroc_ovr`` is the one-vs-rest AUROC macro-averaged over the classes
        **present in** ``y_true``: classes absent from the evaluated split have no positives,
        so they are left out of the average rather than turning it into ``NaN``. With fewer than
        two classes present it is ``None``.

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.training.metrics import classification_metrics
    >>> y = np.array([0, 1, 1, -1])
    >>> p = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.5, 0.5, 0.0]])
    >>> m = classification_metrics(y, p)
    >>> round(m["accuracy"], 3), m["auroc_ovr"], m["n_cells"]
    (0.667, 1.0, 3)
    """
    y, p = _labelled_predictions(y_true, probabilities, n_classes)
    n = int(y.size)
    if n == 0:
        return {
            "accuracy": None,
            "macro_f1": None,
            "balanced_accuracy": None,
            "weighted_f1": None,
            "auroc_ovr": None,
            "n_cells": 0,
        }
    y_pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # balanced_accuracy warns when predictions hold classes absent from y_true; expected here
        warnings.simplefilter("ignore", UserWarning)
        balanced = skm.balanced_accuracy_score(y, y_pred)
    return {
        "accuracy": float(skm.accuracy_score(y, y_pred)),
        "macro_f1": float(skm.f1_score(y, y_pred, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced),
        "weighted_f1": float(skm.f1_score(y, y_pred, average="weighted", zero_division=0)),
        "auroc_ovr": _auroc_ovr(y, p),
        "n_cells": n,
    }


def monitor_metrics(y_true: Any, probabilities: Any) -> dict[str, float | int | None]:
    """Accuracy and macro-F1 as :func:`classification_metrics` gives them, in NumPy alone.

    What the Trainer monitors after every evaluation period: the same inputs, checks and values
    (``macro_f1`` over the classes present in the true or predicted labels, F1 of a class
    ``2 tp / (2 tp + fp + fn)``, as scikit-learn computes it), without scikit-learn's parameter
    validation or the AUROC, which cost about a third of a second per call.

    Parameters
    ----------
    y_true
        Integer label codes, shape ``(n,)``; ``-1`` marks unlabelled cells, which are ignored.
    probabilities
        Class scores, shape ``(n, C)``, as for :func:`classification_metrics`.

    Returns
    -------
    dict
        ``accuracy`` and ``macro_f1`` (``None`` without labelled cells) and ``n_cells``.

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.training.metrics import monitor_metrics
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> m = monitor_metrics(np.array([0, 1, 1]), p)
    >>> round(m["accuracy"], 3), round(m["macro_f1"], 3)
    (0.667, 0.667)
    """
    y, p = _labelled_predictions(y_true, probabilities, None)
    n = int(y.size)
    if n == 0:
        return {"accuracy": None, "macro_f1": None, "n_cells": 0}
    y_pred = p.argmax(axis=1)
    n_classes = p.shape[1]
    true_sum = np.bincount(y, minlength=n_classes)
    pred_sum = np.bincount(y_pred, minlength=n_classes)
    tp = np.bincount(y[y == y_pred], minlength=n_classes)
    present = (true_sum + pred_sum) > 0
    # scikit-learn's own arithmetic (float64, (1 + beta^2) tp / (beta^2 true + pred)), so the
    # values are equal to the last bit
    f1 = 2.0 * tp[present] / (1.0 * true_sum[present] + pred_sum[present])
    return {
        "accuracy": float(np.mean((y == y_pred).astype(np.float64))),
        "macro_f1": float(np.nanmean(f1)),
        "n_cells": n,
    }


def per_class_metrics(y_true: Any, y_pred: Any, *, labels: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support for every class.

    Parameters
    ----------
    y_true
        True label codes, shape ``(n,)``; ``-1`` (unlabelled) is ignored.
    y_pred
        Predicted label codes, shape ``(n,)``.
    labels
        Class names; code ``i`` is ``labels[i]``. Every class gets a row, also classes absent
        from ``y_true`` (support 0); undefined ratios are 0.

    Returns
    -------
    pandas.DataFrame
        Columns ``label``, ``precision``, ``recall``, ``f1``, ``support``; one row per class.

    Examples
    --------
    >>> from scdlkit.training.metrics import per_class_metrics
    >>> df = per_class_metrics([0, 1, 1], [0, 1, 0], labels=["B", "T"])
    >>> df["support"].tolist()
    [1, 2]
    """
    labels = [str(x) for x in labels]
    y = _labelled_codes(y_true)
    yp = _labelled_codes(y_pred, name="y_pred")
    if y.shape != yp.shape:
        msg = f"`y_true` {y.shape} and `y_pred` {yp.shape} must have the same shape."
        raise ValueError(msg)
    _check_range(y, len(labels), name="y_true")
    _check_range(yp, len(labels), name="y_pred")
    mask = y >= 0
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y[mask], yp[mask], labels=np.arange(len(labels)), zero_division=0
    )
    return pd.DataFrame(
        {
            "label": labels,
            "precision": precision.astype(float),
            "recall": recall.astype(float),
            "f1": f1.astype(float),
            "support": support.astype(np.int64),
        }
    )


def confusion_matrix(y_true: Any, y_pred: Any, *, n_classes: int) -> np.ndarray:
    """Counts of true (rows) against predicted (columns) label codes.

    Parameters
    ----------
    y_true
        True label codes, shape ``(n,)``; ``-1`` (unlabelled) is ignored.
    y_pred
        Predicted label codes, shape ``(n,)``.
    n_classes
        Number of classes; the matrix is ``(n_classes, n_classes)``.

    Returns
    -------
    numpy.ndarray
        ``int64`` matrix; entry ``[i, j]`` counts cells of class ``i`` predicted as ``j``.

    Examples
    --------
    >>> from scdlkit.training.metrics import confusion_matrix
    >>> confusion_matrix([0, 1, 1, -1], [0, 0, 1, 1], n_classes=2).tolist()
    [[1, 0], [1, 1]]
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer) or n_classes < 1:
        msg = f"`n_classes` must be a positive integer; got {n_classes!r}."
        raise ValueError(msg)
    y = _labelled_codes(y_true)
    yp = _labelled_codes(y_pred, name="y_pred")
    if y.shape != yp.shape:
        msg = f"`y_true` {y.shape} and `y_pred` {yp.shape} must have the same shape."
        raise ValueError(msg)
    _check_range(y, n_classes, name="y_true")
    _check_range(yp, n_classes, name="y_pred")
    mask = y >= 0
    if np.any(yp[mask] < 0):
        msg = "`y_pred` holds -1 for a labelled cell; predictions must be class codes."
        raise ValueError(msg)
    flat = y[mask] * n_classes + yp[mask]
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def json_safe(obj: Any) -> Any:
    """Convert a nested result into plain Python that strict JSON accepts.

    Parameters
    ----------
    obj
        Any nesting of mappings, sequences, NumPy scalars/arrays, pandas Series/DataFrames,
        torch tensors, paths and Python scalars.

    Returns
    -------
    Any
        The same structure built from ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``
        and ``None``; ``NaN`` and infinities become ``None``, mapping keys become strings
        (``None``/bool/number keys keep JSON's usual rendering), DataFrames become a list of
        row records. ``json.dumps(json_safe(obj), allow_nan=False)`` succeeds.

    Examples
    --------
    >>> import json, numpy as np
    >>> from scdlkit.training.metrics import json_safe
    >>> json.dumps(json_safe({"auroc": np.float32("nan"), "n": np.int64(3)}), allow_nan=False)
    '{"auroc": null, "n": 3}'
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, pd.DataFrame):
        return json_safe(obj.to_dict(orient="records"))
    if isinstance(obj, pd.Series | pd.Index):
        return json_safe(obj.tolist())
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {_json_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor without importing torch
        return json_safe(obj.detach().cpu().tolist())
    msg = f"json_safe cannot convert an object of type {type(obj).__name__}; convert it first."
    raise TypeError(msg)


def _json_key(key: Any) -> str:
    if isinstance(key, np.generic):
        key = key.item()
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)
