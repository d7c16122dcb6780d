"""The model a runner labels with: chosen on held-out cells, then fitted on every labelled cell.

Selection needs held-out cells; labelling does not. CellTypist users label with a model fitted on
every labelled reference cell, and for a closed-form fit (``frozen_probe``, ``baseline``: a
logistic regression with fixed settings, nothing chosen on the held-out cells) refitting on them
is safe and is the default (``refit="auto"``). A trained strategy is refitted only on request
(``refit="always"``), for the optimiser steps its kept weights had in selection, with no early
stopping: nothing checks the refitted weights, so the reported metrics stay those of the
held-out evaluation and :attr:`final_models_` says which model each strategy labels with.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np

from scdlkit.foundation._conformal import ConformalCalibration
from scdlkit.foundation._fitting import FitContext, StrategyFamily, StrategyResult

__all__ = ["KEEP_CHOICES", "REFIT_CHOICES", "final_model", "kept_models", "refits"]

#: ``"auto"``: refit the closed-form strategies; ``"always"``: every kept one; ``"never"``.
REFIT_CHOICES = ("auto", "always", "never")
#: ``"best"``: keep the selected strategy's model; ``"all"``: every fitted strategy's.
KEEP_CHOICES = ("best", "all")


def refits(family: StrategyFamily, refit: str) -> bool:
    """Whether a kept strategy of ``family`` is refitted on every labelled cell."""
    if refit == "auto":
        return family.refit_by_default
    return refit == "always"


def final_model(
    name: str,
    family: StrategyFamily,
    result: StrategyResult,
    ctx: FitContext,
    *,
    refit: str,
    settings: dict[str, Any],
    config: Any,
) -> tuple[StrategyResult, dict[str, Any]]:
    """The result ``name`` labels with, and the record of how it was fitted.

    The selection fit ``result`` keeps its held-out metrics; when ``refit`` applies, its model
    is replaced by one fitted on every labelled cell of ``ctx.prepared``.
    """
    train = ctx.split.train_indices
    final = copy.copy(result)  # the selection fit's result keeps its own model
    record: dict[str, Any] = {
        "strategy": name,
        "fitted_on": "training cells",
        "n_cells": len(ctx.fit_cells()[0]),
        "refit": False,
    }
    if not refits(family, refit):
        return final, record
    # every labelled cell but the calibration cells, which must stay unseen to calibrate on,
    # and with calibration batches every cell of theirs (the guarantee is about new batches)
    calibration = ctx.split.calibration_indices
    reserved = calibration
    if ctx.split.calibration_batches:
        in_batches = np.isin(ctx.prepared.batches, ctx.split.calibration_batches)
        reserved = np.union1d(reserved, np.flatnonzero(in_batches))
    labelled = np.setdiff1d(np.flatnonzero(ctx.prepared.labelled), reserved)
    everything = replace(
        ctx.split, train_indices=labelled, val_indices=train[:0], test_indices=train[:0]
    )
    refit_ctx = replace(ctx, split=everything, early_stopping_fraction=0.0)
    steps = result.extra.get("best_step")
    if steps is not None:  # a trained strategy: exactly the steps its kept weights had, no stopping
        steps = max(int(steps), 1)
        # the last step's weights: without stop cells "best" would mean the lowest training loss
        settings = {**settings, "min_steps": steps, "max_steps": steps, "keep": "last"}
        settings["early_stopping_patience"] = None
    refitted = family.fit(name, refit_ctx, settings, config)
    final.model = refitted.model
    final.training = refitted.training
    final.extra = dict(result.extra)
    proba = refitted.extra.get("calibration_probabilities")
    if proba is not None:  # the refitted model's sets are calibrated on its own scores
        codes = ctx.prepared.label_codes[calibration]
        final.extra["conformal"] = ConformalCalibration.fit(proba, codes)
    fitted_on = None
    if ctx.split.calibration_batches:
        fitted_on = "all labelled cells but those of the calibration batches"
    elif len(calibration):
        fitted_on = "all labelled cells but the calibration cells"
    record.update(fitted_on=fitted_on or "all labelled cells", n_cells=len(labelled), refit=True)
    if steps is not None:
        record["steps"] = int(steps)
    return final, record


def kept_models(
    results: dict[str, StrategyResult],
    best: str,
    families: dict[str, StrategyFamily],
    ctx: FitContext,
    *,
    refit: str,
    keep: str,
    settings: Any,
    configs: dict[str, Any],
) -> tuple[dict[str, StrategyResult], dict[str, dict[str, Any]]]:
    """The results whose models the runner keeps (the best, or every one with ``keep="all"``),
    each refitted where ``refit`` says, and the record of how each kept model was fitted."""
    names = [best] + [n for n in results if n != best] if keep == "all" else [best]
    kept, records = {}, {}
    for name in names:
        kept[name], records[name] = final_model(
            name,
            families[name],
            results[name],
            ctx,
            refit=refit,
            settings=settings(name),
            config=configs.get(name),
        )
    return kept, records
