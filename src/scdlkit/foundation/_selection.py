"""Scoring fitted strategies on held-out cells and ranking them (the selection protocol)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "METRIC_NAMES",
    "batch_metrics",
    "evaluate_splits",
    "metrics_row",
    "rank_key",
    "summarise_repeats",
]

METRIC_NAMES = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr")
#: Reported beside the plain metrics when a confidence threshold labels unsure cells "Unknown".
THRESHOLD_METRICS = ("unknown_share", "called_accuracy")
#: Test-cell columns of the conformal prediction sets (with calibration cells): coverage and mean
#: size of the sets at the default error rate, share of cells without a single label, expected
#: calibration error before and after temperature scaling.
CONFORMAL_METRICS = ("coverage", "set_size", "set_unknown_share", "ece", "ece_scaled")
_SPLIT_PREFIXES = (("val", "validation"), ("test", "test"))
N_BOOTSTRAP = 1000
BASELINE = "baseline"


def evaluate_splits(
    split_cells: Callable[[str], tuple[np.ndarray, np.ndarray]],
    proba_for: Callable[[str, np.ndarray], np.ndarray],
    n_classes: int,
    confidence_threshold: float | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Validation and test metrics of one strategy, and its test probabilities.

    ``split_cells(name)`` gives the cells and label codes of a split; ``proba_for(split, cells)``
    the strategy's probabilities for them. An empty split gets ``None`` metrics. With a
    ``confidence_threshold``, the share of cells it calls unknown and the accuracy on the cells it
    does call are reported beside the plain (threshold-free) metrics.
    """
    # scdlkit.training's package imports the Trainer (lightning_fabric): only when scoring
    from scdlkit.training.metrics import classification_metrics

    out: dict[str, Any] = {}
    test_proba = None
    for split, prefix in _SPLIT_PREFIXES:
        cells, labels = split_cells(split)
        if len(cells) == 0:
            out.update({f"{prefix}_{m}": None for m in METRIC_NAMES})
            continue
        proba = proba_for(split, cells)
        if split == "test":
            test_proba = proba
        metrics = classification_metrics(labels, proba, n_classes=n_classes)
        out.update({f"{prefix}_{m}": metrics[m] for m in METRIC_NAMES})
        if confidence_threshold is not None:
            called = proba.max(axis=1) >= confidence_threshold
            out[f"{prefix}_unknown_share"] = float(1 - called.mean())
            out[f"{prefix}_called_accuracy"] = (
                float((proba[called].argmax(axis=1) == labels[called]).mean())
                if called.any()
                else None
            )
    return out, test_proba


def metrics_row(
    strategy: str, metrics: Mapping[str, Any], trainable_parameters: int, runtime_sec: float
) -> dict[str, Any]:
    """One row of ``strategy_metrics_``: undefined metrics become NaN."""
    row: dict[str, Any] = {"strategy": strategy}
    threshold = any(f"test_{m}" in metrics for m in THRESHOLD_METRICS)
    names = METRIC_NAMES + (THRESHOLD_METRICS if threshold else ())
    for _, prefix in _SPLIT_PREFIXES:
        for m in names:
            value = metrics.get(f"{prefix}_{m}")
            row[f"{prefix}_{m}"] = np.nan if value is None else float(value)
    if "test_coverage" in metrics:
        for m in CONFORMAL_METRICS:
            value = metrics.get(f"test_{m}")
            row[f"test_{m}"] = np.nan if value is None else float(value)
    row["trainable_parameters"] = int(trainable_parameters)
    row["runtime_sec"] = float(runtime_sec)
    return row


def rank_key(row: Mapping[str, Any]) -> tuple:
    """Validation macro-F1, then balanced accuracy, accuracy, fewer parameters, less runtime."""

    def score(name: str) -> float:
        value = row.get(f"validation_{name}")
        return -np.inf if value is None or not np.isfinite(value) else float(value)

    return (
        -score("macro_f1"),
        -score("balanced_accuracy"),
        -score("accuracy"),
        row["trainable_parameters"],
        row["runtime_sec"],
    )


def batch_metrics(
    test_proba: Mapping[str, np.ndarray | None], labels: np.ndarray, batch_of: np.ndarray
) -> pd.DataFrame:
    """Accuracy and macro-F1 (over the classes present) per test batch and strategy."""
    # scikit-learn is imported where used: per-batch metrics are rare
    from sklearn.metrics import accuracy_score, f1_score

    rows = []
    for name, proba in test_proba.items():
        if proba is None:
            continue
        predicted = proba.argmax(axis=1)
        for batch in sorted(set(batch_of)):
            mask = batch_of == batch
            # the class set of the main metric: classes present in truth or prediction
            present = np.union1d(labels[mask], predicted[mask])
            rows.append(
                {
                    "strategy": name,
                    "batch": batch,
                    "n_cells": int(mask.sum()),
                    "accuracy": float(accuracy_score(labels[mask], predicted[mask])),
                    "macro_f1": float(
                        f1_score(
                            labels[mask],
                            predicted[mask],
                            labels=present,
                            average="macro",
                            zero_division=0,
                        )
                    ),
                }
            )
    return pd.DataFrame(rows, columns=["strategy", "batch", "n_cells", "accuracy", "macro_f1"])


def summarise_repeats(
    repeats: pd.DataFrame,
    *,
    test_labels: np.ndarray | None = None,
    test_proba: Mapping[str, np.ndarray | None] | None = None,
    random_state: int = 0,
    held_out_ratio: float | None = None,
) -> pd.DataFrame:
    """One row per strategy from ``repeats`` (one row per strategy and repeat).

    The metric columns hold the mean over repeats, each followed by ``<column>_sd`` when there
    are several repeats. Intervals, named for what they cover:

    - several repeats (one fixed test set; training and validation cells redrawn, new seeds):
      ``test_macro_f1_t_ci_low``/``_high``, a 95% t interval over repeats with Nadeau and
      Bengio's correction for the training cells the repeats share (variance times
      ``1/n + held_out_ratio``, ``held_out_ratio`` = validation / training cells of a repeat).
      It covers the variation from redrawing training cells and seeds, on this test set.
    - one repeat: ``test_macro_f1_boot_ci_low``/``_high``, a bootstrap 95% interval over the
      test cells of the one fitted model (no training or seed variation).

    When the baseline was fitted, ``test_macro_f1_vs_baseline`` is each strategy's paired
    difference from it, with ``_t_ci_`` or ``_boot_ci_`` bounds as above. Each interval is for
    one comparison at a time: with several strategies, several are made at once.
    """
    n_repeats = repeats["repeat"].nunique()
    columns = [c for c in repeats.columns if c not in {"strategy", "repeat"}]
    grouped = repeats.groupby("strategy", sort=False)
    mean, sd = grouped[columns].mean(), grouped[columns].std(ddof=1)
    rows = []
    for name in mean.index:
        row: dict[str, Any] = {"strategy": name}
        for column in columns:
            row[column] = float(mean.loc[name, column])
            if column == "trainable_parameters":
                row[column] = int(row[column])
            if n_repeats > 1 and _is_metric(column):
                row[f"{column}_sd"] = float(sd.loc[name, column])
        rows.append(row)
    frame = pd.DataFrame(rows)
    if n_repeats == 1 and test_proba is not None and test_labels is not None:
        _bootstrap_intervals(frame, test_labels, test_proba, random_state)
    elif n_repeats > 1:
        if held_out_ratio is None:
            msg = (
                "held_out_ratio (validation / training cells) is needed to correct the t interval."
            )
            raise ValueError(msg)
        _repeat_intervals(frame, repeats, held_out_ratio)
    return frame


def corrected_t_interval(
    values: np.ndarray, held_out_ratio: float, level: float = 0.95
) -> tuple[float, float]:
    """Nadeau and Bengio's corrected resampled t interval of the mean of ``values``.

    Repeats that share training cells are not independent: the variance of their mean is
    ``(1/n + held_out_ratio) * s^2`` rather than ``s^2 / n`` (Nadeau & Bengio 2003, Machine
    Learning 52:239), with ``held_out_ratio`` the held-out / training cells of one repeat.
    """
    from scipy.stats import t  # scipy comes with scikit-learn; needed here only

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 2:
        return (np.nan, np.nan)
    half = t.ppf(0.5 + level / 2, n - 1) * np.sqrt((1 / n + held_out_ratio) * values.var(ddof=1))
    return (float(values.mean() - half), float(values.mean() + half))


def _is_metric(column: str) -> bool:
    return column.startswith(("validation_", "test_"))


def _boot_macro_f1(labels: np.ndarray, predicted: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Macro-F1 (over the classes present in truth or prediction) of every resample in ``draws``
    (``(n_boot, n_cells)`` positions), vectorised over resamples."""
    n_classes = int(max(labels.max(), predicted.max())) + 1
    offsets = np.arange(len(draws))[:, None] * n_classes
    true, pred = labels[draws] + offsets, predicted[draws] + offsets
    size = len(draws) * n_classes
    hits = np.bincount(true[true == pred], minlength=size).reshape(-1, n_classes)
    support = np.bincount(true.ravel(), minlength=size).reshape(-1, n_classes)
    called = np.bincount(pred.ravel(), minlength=size).reshape(-1, n_classes)
    seen = support + called
    f1 = np.where(seen > 0, 2 * hits / np.maximum(seen, 1), 0.0)
    return f1.sum(axis=1) / np.maximum((seen > 0).sum(axis=1), 1)


def _bootstrap_intervals(
    frame: pd.DataFrame,
    labels: np.ndarray,
    test_proba: Mapping[str, np.ndarray | None],
    random_state: int,
) -> None:
    if len(labels) == 0:
        return
    draws = np.random.default_rng(random_state).integers(
        0, len(labels), size=(N_BOOTSTRAP, len(labels))
    )
    scores = {
        name: _boot_macro_f1(labels, proba.argmax(axis=1), draws)
        for name, proba in test_proba.items()
        if proba is not None
    }
    order = list(frame["strategy"])
    low = [np.quantile(scores[s], 0.025) if s in scores else np.nan for s in order]
    high = [np.quantile(scores[s], 0.975) if s in scores else np.nan for s in order]
    at = frame.columns.get_loc("test_macro_f1") + 1
    frame.insert(at, "test_macro_f1_boot_ci_low", low)
    frame.insert(at + 1, "test_macro_f1_boot_ci_high", high)
    if BASELINE not in scores:
        return
    point = frame.set_index("strategy")["test_macro_f1"]
    diffs = {s: scores[s] - scores[BASELINE] for s in scores}
    frame["test_macro_f1_vs_baseline"] = [
        point[s] - point[BASELINE] if s in diffs else np.nan for s in order
    ]
    frame["test_macro_f1_vs_baseline_boot_ci_low"] = [
        np.quantile(diffs[s], 0.025) if s in diffs else np.nan for s in order
    ]
    frame["test_macro_f1_vs_baseline_boot_ci_high"] = [
        np.quantile(diffs[s], 0.975) if s in diffs else np.nan for s in order
    ]


def _repeat_intervals(frame: pd.DataFrame, repeats: pd.DataFrame, held_out_ratio: float) -> None:
    scores = repeats.pivot(index="repeat", columns="strategy", values="test_macro_f1")
    order = list(frame["strategy"])
    bounds = [corrected_t_interval(scores[s].to_numpy(), held_out_ratio) for s in order]
    at = frame.columns.get_loc("test_macro_f1") + 1
    frame.insert(at, "test_macro_f1_t_ci_low", [b[0] for b in bounds])
    frame.insert(at + 1, "test_macro_f1_t_ci_high", [b[1] for b in bounds])
    if BASELINE not in scores.columns:
        return
    diffs = scores.sub(scores[BASELINE], axis=0)
    bounds = [corrected_t_interval(diffs[s].to_numpy(), held_out_ratio) for s in order]
    frame["test_macro_f1_vs_baseline"] = [float(diffs[s].mean()) for s in order]
    frame["test_macro_f1_vs_baseline_t_ci_low"] = [b[0] for b in bounds]
    frame["test_macro_f1_vs_baseline_t_ci_high"] = [b[1] for b in bounds]
