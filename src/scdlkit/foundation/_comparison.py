"""Fitting every strategy on one or several splits, and summarising the comparison."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from scdlkit.foundation._data import split_scgpt_data
from scdlkit.foundation._fitting import FitContext, Stopwatch, StrategyFamily, StrategyResult
from scdlkit.foundation._selection import metrics_row, rank_key, summarise_repeats

__all__ = ["compare_strategies", "fit_strategies", "repeat_splits", "split_summary"]

logger = logging.getLogger("scdlkit")


def fit_strategies(
    families: Mapping[str, StrategyFamily],
    ctx: FitContext,
    *,
    settings: Callable[[str], dict[str, Any]],
    configs: Mapping[str, Any],
    feature_seconds: float,
) -> dict[str, StrategyResult]:
    """Every strategy fitted on one split; each charged for the shared ``<cls>`` pass it used."""
    results: dict[str, StrategyResult] = {}
    for name, family in families.items():
        logger.info("fitting strategy %s", name)
        with Stopwatch() as watch:
            results[name] = family.fit(name, ctx, settings(name), configs.get(name))
        results[name].runtime_sec = watch.seconds + (
            feature_seconds if family.reads_features else 0.0
        )
    return results


def compare_strategies(
    repeats: list[dict[str, StrategyResult]],
    test_labels: np.ndarray,
    *,
    random_state: int,
    held_out_ratio: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(strategy_metrics, repeat_metrics, best strategy)`` from the results of every repeat.

    The best strategy has the highest mean validation macro-F1 (then balanced accuracy,
    accuracy, fewer parameters, less runtime); test metrics are only reported.
    ``held_out_ratio`` (validation / training cells of one repeat) corrects the t intervals of
    several repeats for the training cells they share.
    """
    rows = [
        {
            "repeat": r,
            **metrics_row(res.strategy, res.metrics, res.trainable_parameters, res.runtime_sec),
        }
        for r, results in enumerate(repeats)
        for res in results.values()
    ]
    repeat_metrics = pd.DataFrame(rows)
    first = repeats[0]
    summary = summarise_repeats(
        repeat_metrics,
        test_labels=test_labels,
        test_proba={name: res.extra.get("test_probabilities") for name, res in first.items()},
        random_state=random_state,
        held_out_ratio=held_out_ratio,
    )
    best = min(summary.to_dict(orient="records"), key=rank_key)["strategy"]
    columns = [
        "strategy",
        "repeat",
        *[c for c in repeat_metrics.columns if c not in {"strategy", "repeat"}],
    ]
    return summary, repeat_metrics[columns], best


def repeat_splits(
    prepared: Any,
    *,
    n_repeats: int,
    n_strategies: int,
    random_state: int,
    **split_arguments: Any,
) -> list[Any]:
    """One split per repeat around one outer test set (DESIGN section 7).

    The first repeat draws the test cells; later repeats (seeds ``random_state + r``) redraw
    only training and validation cells, so no test cell ever helps choose.
    """
    splits: list[Any] = []
    for r in range(n_repeats):
        fixed_test = splits[0].test_indices if splits else None
        split = split_scgpt_data(
            prepared, random_state=random_state + r, fixed_test=fixed_test, **split_arguments
        )
        if len(split.val_indices) == 0 and n_strategies > 1:
            msg = (
                f"no validation cells (val_size={split_arguments.get('val_size')}) to rank "
                f"{n_strategies} strategies on: give val_size > 0 (or val_batches= with "
                "split_by='batch'), or fit one strategy at a time."
            )
            raise ValueError(msg)
        splits.append(split)
    return splits


def split_summary(
    split: Any,
    prepared: Any,
    *,
    batch_key: str | None,
    random_state: int,
    val_size: float,
    test_size: float,
) -> dict[str, Any]:
    """How the (first repeat's) cells were split, as JSON-ready values for ``uns`` and reports."""
    return {
        "split_by": split.split_by,
        "batch_key": batch_key or "",
        "test_batches": list(split.test_batches),
        "val_batches": list(split.val_batches),
        "random_state": random_state,
        "val_size": val_size,
        "test_size": test_size,
        "stratified": split.stratified,
        "n_train": len(split.train_indices),
        "n_val": len(split.val_indices),
        "n_test": len(split.test_indices),
        "n_unlabelled": int((~prepared.labelled).sum()),
        "small_classes": list(split.small_classes),
    }
