"""Fitting every strategy on one or several splits, and summarising the comparison."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from scdlkit._shared.splits import stratified_split
from scdlkit._shared.user_warnings import warn_user
from scdlkit.foundation._conformal import (
    ConformalCalibration,
    conformal_metrics,
    reliability_rows,
)
from scdlkit.foundation._data import split_scgpt_data
from scdlkit.foundation._fitting import FitContext, Stopwatch, StrategyFamily, StrategyResult
from scdlkit.foundation._selection import metrics_row, rank_key, summarise_repeats

__all__ = [
    "calibration_curve",
    "carve_calibration",
    "compare_strategies",
    "draw_calibration",
    "fit_strategies",
    "repeat_splits",
    "split_summary",
]

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
        calibrate(results[name], ctx)
    return results


def calibrate(result: StrategyResult, ctx: FitContext) -> None:
    """Calibrate ``result``'s conformal prediction sets on the calibration cells (when there
    are any) and add coverage, set size and calibration error on the test cells to its metrics.
    """
    proba = result.extra.get("calibration_probabilities")
    if proba is None:
        return
    calibration = ConformalCalibration.fit(proba, ctx.cells("calibration")[1])
    result.extra["conformal"] = calibration
    test = result.extra.get("test_probabilities")
    if test is not None:
        scores = conformal_metrics(calibration, test, ctx.cells("test")[1])
        result.metrics.update({f"test_{k}": v for k, v in scores.items()})


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
    calibration_size: float = 0.0,
    calibration_batches: list[str] | None = None,
    **split_arguments: Any,
) -> list[Any]:
    """One split per repeat around one outer test set (DESIGN section 7).

    The first repeat draws the test cells; later repeats (seeds ``random_state + r``) redraw
    only training and validation cells, so no test cell ever helps choose. Calibration cells
    (:func:`carve_calibration`) are then taken out of each repeat's training cells.
    """
    splits: list[Any] = []
    for r in range(n_repeats):
        fixed_test = splits[0].test_indices if splits else None
        split = split_scgpt_data(
            prepared,
            random_state=random_state + r,
            fixed_test=fixed_test,
            reserved_batches=calibration_batches or (),
            **split_arguments,
        )
        if len(split.val_indices) == 0 and n_strategies > 1:
            msg = (
                f"no validation cells (val_size={split_arguments.get('val_size')}) to rank "
                f"{n_strategies} strategies on: give val_size > 0 (or val_batches= with "
                "split_by='batch'), or fit one strategy at a time."
            )
            raise ValueError(msg)
        splits.append(
            carve_calibration(
                split,
                size=calibration_size,
                batches=calibration_batches,
                random_state=random_state + r,
            )
        )
    if calibration_batches is not None and len(set(calibration_batches)) == 1:
        warn_user(
            f"the prediction sets are calibrated on one batch ({calibration_batches[0]!r}): "
            "their error rate holds for new cells like that batch's, not for a new batch "
            "(docs/label_transfer.md measures a new donor's coverage). Name several "
            "calibration_batches when it must hold for new donors."
        )
    return splits


def carve_calibration(
    split: Any, *, size: float, batches: list[str] | None, random_state: int
) -> Any:
    """``split`` with calibration cells taken out of its training cells.

    Calibration cells neither train a strategy nor choose one: the conformal prediction sets
    (:mod:`scdlkit.foundation._conformal`) are calibrated on them. ``batches``: every training
    cell of those batches (the sets then hold for cells like those batches', and for a new batch
    only as far as the calibration batches represent the spread between batches: name several);
    else a stratified ``size``
    share of the labelled cells, drawn from the training cells.
    """
    train = split.train_indices
    prepared = split.prepared
    if batches:
        held = [b for b in batches if b in set(split.test_batches) | set(split.val_batches)]
        if held:
            msg = f"calibration_batches {held} are also test or validation batches; choose others."
            raise ValueError(msg)
        is_cal = np.isin(prepared.batches[train], batches)
        if not is_cal.any() or is_cal.all():
            msg = (
                f"calibration_batches={batches} hold {'no' if not is_cal.any() else 'every'} "
                "training cell; name batches that are neither test nor validation batches and "
                "leave at least one for training."
            )
            raise ValueError(msg)
        return replace(
            split,
            train_indices=train[~is_cal],
            calibration_indices=train[is_cal],
            calibration_batches=list(batches),
        )
    if size <= 0:
        return split
    kept, calibration = draw_calibration(
        train,
        prepared.label_codes[train],
        size=size,
        n_labelled=int(prepared.labelled.sum()),
        random_state=random_state,
    )
    return replace(split, train_indices=kept, calibration_indices=calibration)


def draw_calibration(
    train: np.ndarray, codes: np.ndarray, *, size: float, n_labelled: int, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(training cells kept, calibration cells)``: a stratified ``size`` share of the
    ``n_labelled`` labelled cells, drawn from ``train`` (at most 90 % of it)."""
    share = min(size * n_labelled / max(len(train), 1), 0.9)
    parts, _ = stratified_split(
        train,
        codes,
        val_size=share,
        test_size=0.0,
        random_state=np.random.default_rng([random_state, 7]),
    )
    return parts["train"], parts["val"]


def calibration_curve(
    results: Mapping[str, StrategyResult], test_labels: np.ndarray
) -> pd.DataFrame | None:
    """Reliability-diagram points of every calibrated strategy on the test cells (before and
    after temperature scaling); ``None`` without calibration or test cells."""
    rows = []
    for name, result in results.items():
        calibration = result.extra.get("conformal")
        test = result.extra.get("test_probabilities")
        if calibration is not None and test is not None:
            rows += reliability_rows(name, test, test_labels, calibration.temperature)
    return pd.DataFrame(rows) if rows else None


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
        "n_calibration": len(split.calibration_indices),
        "calibration_batches": list(split.calibration_batches),
        "n_unlabelled": int((~prepared.labelled).sum()),
        "small_classes": list(split.small_classes),
    }
