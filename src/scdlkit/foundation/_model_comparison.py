"""Several foundation models compared in one call, on the same cells and splits as the baseline.

One runner is fitted per checkpoint. Every runner draws its split from the labels and
``random_state`` alone, so all of them train, validate, calibrate and test on the same cells;
this is checked, not assumed. The expression baseline reads no model and is fitted once (with the
first checkpoint). The kept model is the best on validation cells over every (model, strategy).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdlkit._shared.splits import SPLIT_NAMES
from scdlkit.foundation._runner import ScGPTAnnotationRunner
from scdlkit.foundation._selection import rank_key
from scdlkit.foundation.models import resolve_model_checkpoint
from scdlkit.foundation.strategies import strategy_family

__all__ = ["ModelComparison", "adapt_models"]


@dataclass
class ModelComparison:
    """The fitted runners of :func:`adapt_models` and their joint table.

    Attributes
    ----------
    runners
        ``{model label: fitted runner}``, in the order the checkpoints were given. A label is
        the model's registry name, numbered (``geneformer_1``, ``geneformer_2``) when one model
        appears more than once; ``uns[key]["models"]`` records each label's checkpoint.
    strategy_metrics
        One row per (model, strategy): each runner's ``strategy_metrics_`` with a ``model``
        column first (``"expression"`` for the baseline, which reads no model).
    best_model
        Label of the runner holding the best (model, strategy) on validation cells.
    """

    runners: dict[str, ScGPTAnnotationRunner]
    strategy_metrics: pd.DataFrame
    best_model: str

    @property
    def best_runner(self) -> ScGPTAnnotationRunner:
        """The runner whose kept model labels the cells."""
        return self.runners[self.best_model]


def _labels(models: Sequence[Any]) -> list[str]:
    """The model's name, numbered when a model appears more than once (``geneformer_2``); safe as
    a folder name on every platform. ``models`` are resolved checkpoints."""
    paths = [m.path for m in models]
    if len(set(paths)) != len(paths):
        msg = f"checkpoints {[str(p) for p in paths]} name one checkpoint twice."
        raise ValueError(msg)
    names = [m.model_name for m in models]
    labels, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if names.count(name) == 1 else f"{name}_{seen[name]}")
    return labels


def _same_splits(runners: dict[str, ScGPTAnnotationRunner]) -> None:
    first_label, first = next(iter(runners.items()))
    for label, runner in runners.items():
        for split in (*SPLIT_NAMES, "calibration"):
            if not np.array_equal(first.split_.indices(split), runner.split_.indices(split)):
                msg = (
                    f"the {split} cells of {label!r} differ from those of {first_label!r}: the "
                    "models were not compared on the same cells (a model dropped cells?)."
                )
                raise RuntimeError(msg)


def adapt_models(
    adata: Any,
    *,
    checkpoints: Sequence[str | os.PathLike | Any],
    strategies: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ModelComparison:
    """Fit ``strategies`` for every checkpoint on the same splits; keep the best overall.

    Parameters
    ----------
    adata
        Labelled reference cells, in a form every model reads (Geneformer: raw counts).
    checkpoints
        Two or more checkpoint folders (or official names), of any registered models.
    strategies
        As for :class:`ScGPTAnnotationRunner`; the expression baseline is fitted once.
    output_dir
        Each runner and its artifacts go to ``output_dir/<model label>/``.
    **kwargs
        Further :class:`ScGPTAnnotationRunner` arguments, the same for every model.

    Returns
    -------
    ModelComparison
    """
    if isinstance(checkpoints, str | os.PathLike) or len(checkpoints) < 2:
        msg = "adapt_models compares two or more checkpoints; pass a list of them."
        raise ValueError(msg)
    models = [resolve_model_checkpoint(c) for c in checkpoints]  # once: runners reuse them
    labels = _labels(models)
    runners: dict[str, ScGPTAnnotationRunner] = {}
    for i, (label, checkpoint) in enumerate(zip(labels, models, strict=True)):
        chosen = [s for s in strategies if i == 0 or strategy_family(s).uses_checkpoint]
        if not chosen:
            continue
        runners[label] = ScGPTAnnotationRunner(
            checkpoint=checkpoint,
            strategies=chosen,
            output_dir=None if output_dir is None else Path(output_dir) / label,
            **kwargs,
        ).fit(adata)
    _same_splits(runners)
    frames = []
    for label, runner in runners.items():
        frame = runner.strategy_metrics_.copy()
        uses_model = [strategy_family(s).uses_checkpoint for s in frame["strategy"]]
        frame.insert(0, "model", np.where(uses_model, label, "expression"))
        frames.append(frame)
    # each runner's best, ranked as a runner ranks its strategies (validation cells only)
    best_rows = {
        label: runner.strategy_metrics_.set_index("strategy", drop=False).loc[runner.best_strategy_]
        for label, runner in runners.items()
    }
    best = min(best_rows, key=lambda label: rank_key(best_rows[label].to_dict()))
    return ModelComparison(runners, pd.concat(frames, ignore_index=True), best)
