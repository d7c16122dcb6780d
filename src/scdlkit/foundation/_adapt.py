"""One call to fit and compare strategies, and where a runner saved without a folder goes."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scdlkit._shared.cache import default_cache_dir
from scdlkit._shared.strategies import DEFAULT_STRATEGIES
from scdlkit.foundation._runner import ScGPTAnnotationRunner
from scdlkit.foundation.models._contract import ModelCheckpoint

__all__ = ["adapt_scgpt_annotation", "default_runner_dir"]


def adapt_scgpt_annotation(
    adata: Any,
    *,
    label_key: str,
    checkpoint: str | os.PathLike | ModelCheckpoint = "whole-human",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    strategy_configs: Mapping[str, Any] | None = None,
    lora_config: Any = None,
    batch_size: int = 64,
    val_size: float = 0.15,
    test_size: float = 0.15,
    random_state: int = 42,
    device: str = "auto",
    output_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ScGPTAnnotationRunner:
    """Fit and compare adaptation strategies on labelled cells; return the fitted runner.

    One call for :class:`ScGPTAnnotationRunner` ``(...).fit(adata)``; the AnnData is not
    modified (use :func:`scdlkit.tl.adapt_annotation` to write results into it).

    Parameters
    ----------
    adata
        Labelled reference cells.
    label_key, checkpoint, strategies, strategy_configs, lora_config, batch_size
        See :class:`ScGPTAnnotationRunner`.
    val_size, test_size, random_state, device, output_dir
        See :class:`ScGPTAnnotationRunner`.
    **kwargs
        Further :class:`ScGPTAnnotationRunner` arguments (``gene_key``, ``layer``, ``training``,
        ``epochs``, ``lr``, ``early_stopping_patience``, ``class_weight``, ``precision``,
        ``confidence_threshold``, ``n_repeats``, ``progress``, ...).

    Returns
    -------
    ScGPTAnnotationRunner
        The fitted :class:`ScGPTAnnotationRunner`.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or out of range (a wrong type is both), before any work:
        the message names the argument and what it accepts. A ValueError also when training
        diverges (:class:`~scdlkit.training.TrainingDivergedError`, naming the learning rates).

    Examples
    --------
    >>> runner = sck.adapt_annotation(
    ...     adata, label_key="cell_type", strategies=("frozen_probe", "head", "lora")
    ... )  # doctest: +SKIP
    >>> runner.best_strategy_  # doctest: +SKIP
    """
    runner = ScGPTAnnotationRunner(
        label_key=label_key,
        checkpoint=checkpoint,
        strategies=strategies,
        strategy_configs=strategy_configs,
        lora_config=lora_config,
        batch_size=batch_size,
        val_size=val_size,
        test_size=test_size,
        random_state=random_state,
        device=device,
        output_dir=output_dir,
        **kwargs,
    )
    return runner.fit(adata)


def default_runner_dir() -> Path:
    """A fresh folder for a runner saved without ``output_dir``: ``<cache>/runners/<time>-<id>``.

    In the scdlkit cache (``$SCDLKIT_CACHE_DIR``, else the platform's cache folder), not the
    system's temporary folder, which a reboot or a cleaner may empty while
    ``uns[key]["runner_dir"]`` still points at it. Named by the UTC time of the save, so old
    runs are easy to find and delete.
    """
    parent = default_cache_dir() / "runners"
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S-", time.gmtime())
    return Path(tempfile.mkdtemp(prefix=stamp, dir=parent))
