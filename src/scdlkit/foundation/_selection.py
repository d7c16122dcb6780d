"""Scoring fitted strategies on held-out cells and ranking them (the selection protocol)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["METRIC_NAMES", "batch_metrics", "evaluate_splits", "metrics_row", "rank_key"]

METRIC_NAMES = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr")
_SPLIT_PREFIXES = (("val", "validation"), ("test", "test"))


def evaluate_splits(
    split_cells: Callable[[str], tuple[np.ndarray, np.ndarray]],
    proba_for: Callable[[str, np.ndarray], np.ndarray],
    n_classes: int,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Validation and test metrics of one strategy, and its test probabilities.

    ``split_cells(name)`` gives the cells and label codes of a split; ``proba_for(split, cells)``
    the strategy's probabilities for them. An empty split gets ``None`` metrics.
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
    return out, test_proba


def metrics_row(
    strategy: str, metrics: Mapping[str, Any], trainable_parameters: int, runtime_sec: float
) -> dict[str, Any]:
    """One row of ``strategy_metrics_``: undefined metrics become NaN."""
    row: dict[str, Any] = {"strategy": strategy}
    for _, prefix in _SPLIT_PREFIXES:
        for m in METRIC_NAMES:
            value = metrics.get(f"{prefix}_{m}")
            row[f"{prefix}_{m}"] = np.nan if value is None else float(value)
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
            present = np.unique(labels[mask])
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
