from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from anndata import AnnData

from scdlkit._shared.arguments import (
    check_bool,
    check_int,
    check_number,
    check_optional_int,
    check_optional_number,
)
from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import annotation_slots, check_key_added, fit_summary_uns
from scdlkit._shared.strategies import DEFAULT_STRATEGIES
from scdlkit.tl._checks import (
    check_checkpoint,
    check_device,
    check_has_cells,
    check_optional_path,
    check_optional_str,
    check_random_state,
    check_str,
)

__all__ = ["adapt_annotation"]

logger = logging.getLogger("scdlkit")


def adapt_annotation(
    adata: AnnData,
    label_key: str,
    *,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike] = "whole-human",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    strategy_configs: Mapping[str, Any] | None = None,
    lora_config: Any = None,
    batch_size: int = 64,
    val_size: float = 0.15,
    test_size: float = 0.15,
    random_state: int = 42,
    device: str = "auto",
    output_dir: str | os.PathLike | None = None,
    n_repeats: int = 1,
    key_added: str = "scgpt_annotation",
    copy: bool = False,
    **kwargs: Any,
) -> AnnData | None:
    """Adapt scGPT to the labelled cells of ``adata``, compare strategies, keep the best.

    Every argument is checked before any work, and every slot is built before the first is
    written, so a call that fails leaves ``adata`` exactly as it was.

    Fits every strategy on a stratified train split, ranks them by validation macro-F1, keeps
    the best, labels every cell (unlabelled ones included) and writes the results into ``adata``.
    The fitted runner is saved to ``output_dir/runner`` (when ``output_dir`` is ``None``, to a
    fresh folder ``runners/<UTC time>-<id>`` of the scdlkit cache, ``$SCDLKIT_CACHE_DIR`` or the
    platform's cache folder such as ``~/.cache/scdlkit``; delete old ones at will); its path is in
    ``uns[key_added]["runner_dir"]`` for :func:`scdlkit.tl.annotate`.

    Parameters
    ----------
    adata
        Reference cells: raw counts or log-normalised values, gene symbols.
    label_key
        ``adata.obs`` column with cell types; missing values mark unlabelled cells (left out of
        training and evaluation, still labelled).
    checkpoint
        Official scGPT checkpoint name (found in the local cache) or a checkpoint folder; its
        layout says which model it is (scGPT, Geneformer). A list of checkpoints compares the
        models: the strategies are fitted for each on the same splits (the baseline once),
        ``uns[key_added]["strategy_metrics"]`` gets one row per (model, strategy) with a
        ``model`` column, ``uns[key_added]["models"]`` records each model's runner, and the best
        (model, strategy) on validation cells labels the cells (``uns[key_added]["model"]``).
    strategies
        Among ``"frozen_probe"``, ``"head"``, ``"full_finetune"``, ``"lora"``, ``"adapter"``,
        ``"prefix_tuning"``, ``"ia3"``, ``"baseline"``.
    strategy_configs
        ``{strategy: config}`` for parameter-efficient strategies.
    lora_config
        Legacy alias of ``strategy_configs={"lora": ...}``.
    batch_size, val_size, test_size, random_state, device
        See :class:`scdlkit.AnnotationRunner`.
    output_dir
        Folder for the saved runner and the artifacts (metrics CSV, predictions CSV, report.md,
        PNG plots). A folder that already holds a run is refused before any work unless
        ``overwrite=True`` is passed; the run's files are moved in together, with
        ``run_complete.json`` last.
    n_repeats
        Fit every strategy on this many splits: ``strategy_metrics`` then holds means with
        ``<column>_sd`` beside each metric and ``repeat_metrics`` one row per strategy and
        repeat; the ranking uses the mean validation macro-F1. With one repeat, test macro-F1
        carries a bootstrap 95% interval. Labels and ``_split`` come from the first repeat.
    key_added
        Prefix of the written slots: a string without ``/``, backslash or NUL (h5ad and zarr
        refuse them). Refused before any work when the slots would replace the label or batch
        column, or obs/obsm entries that scdlkit did not write.
    copy
        Return a modified copy instead of writing into ``adata``.
    **kwargs
        Further :class:`scdlkit.AnnotationRunner` arguments: ``gene_key``, ``layer``,
        ``batch_key``, ``split_by``, ``test_batches``, ``val_batches``, ``training``,
        ``epochs``, ``lr``, ``early_stopping_patience``, ``class_weight``,
        ``precision``, ``confidence_threshold``, ``overwrite``, ``progress``.

    Returns
    -------
    AnnData or None
        ``None``, or the annotated copy when ``copy=True``. Writes:

        - ``obs[key_added]``: predicted labels (categorical);
        - ``obs[f"{key_added}_confidence"]``: probability of the predicted label;
        - ``obs[f"{key_added}_split"]``: ``train``/``val``/``test``/``unlabelled``;
        - ``obsm[f"X_{key_added}"]``: the best model's cell representation;
        - ``uns[key_added]``: ``params``, ``best_strategy``, ``strategy_metrics`` (DataFrame),
          ``label_categories``, ``history``, ``runner_dir``, ``split``, ``versions``, and with
          ``batch_key`` ``batch_metrics`` (DataFrame: strategy, batch, n_cells, accuracy, macro_f1
          for each test batch).

    Examples
    --------
    >>> sck.tl.adapt_annotation(
    ...     adata, "cell_type", strategies=("frozen_probe", "head", "lora"), output_dir="runs/pbmc"
    ... )  # doctest: +SKIP
    >>> sck.pl.strategy_comparison(adata)  # doctest: +SKIP
    """
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import adapt_models, adapt_scgpt_annotation, default_runner_dir

    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    check_has_cells(adata, "adapt_annotation")
    label_key = check_str("label_key", label_key)
    several = isinstance(checkpoint, list | tuple)
    if several:
        checkpoint = [check_checkpoint("checkpoint", c) for c in checkpoint]
    else:
        checkpoint = check_checkpoint("checkpoint", checkpoint)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    val_size = check_number("val_size", val_size, min_value=0.0, max_value=1.0, max_inclusive=False)
    test_size = check_number(
        "test_size", test_size, min_value=0.0, max_value=1.0, max_inclusive=False
    )
    random_state = check_random_state(random_state)
    device = check_device(device)
    output_dir = check_optional_path("output_dir", output_dir)
    n_repeats = check_int("n_repeats", n_repeats, min_value=1)
    kwargs = _check_runner_kwargs(kwargs)
    key_added = check_key_added(adata, key_added, inputs=(label_key, kwargs.get("batch_key")))
    common = {
        "label_key": label_key,
        "strategies": strategies,
        "strategy_configs": strategy_configs,
        "lora_config": lora_config,
        "batch_size": batch_size,
        "val_size": val_size,
        "test_size": test_size,
        "random_state": random_state,
        "device": device,
        "output_dir": output_dir,
        "n_repeats": n_repeats,
        **kwargs,
    }
    if several:
        comparison = adapt_models(adata, checkpoints=checkpoint, **common)
        runner = comparison.best_runner
    else:
        comparison = None
        runner = adapt_scgpt_annotation(adata, checkpoint=checkpoint, **common)
    if runner.runner_dir_ is None:
        runner.save(default_runner_dir())
        logger.warning(
            "runner saved to %s (the scdlkit cache; pass output_dir= to choose the folder)",
            runner.runner_dir_,
        )
    uns = fit_summary_uns(runner)
    if comparison is not None:
        uns["strategy_metrics"] = comparison.strategy_metrics.copy()
        uns["model"] = comparison.best_model
        uns["models"] = {
            label: {
                "checkpoint": str(r.checkpoint_.path),
                "runner_dir": str(r.runner_dir_ or ""),
                "best_strategy": r.best_strategy_,
            }
            for label, r in comparison.runners.items()
        }
    slots = annotation_slots(
        adata,
        runner,
        runner.reference_predictions(),
        key_added=key_added,
        split=runner.split_.split_labels(),
        uns=uns,
    )
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None


#: Checks of the runner arguments passed through ``**kwargs`` whose type and range are plain.
_RUNNER_KWARG_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "gene_key": check_optional_str,
    "layer": check_optional_str,
    "batch_key": check_optional_str,
    "confidence_threshold": partial(check_optional_number, min_value=0.0, max_value=1.0),
    "epochs": partial(check_optional_int, min_value=1),
    "lr": partial(check_optional_number, min_value=0.0, min_inclusive=False),
    "overwrite": check_bool,
    "progress": check_bool,
}


def _check_runner_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the plain ones checked and in Python types (the runner checks the rest)."""
    return {
        name: _RUNNER_KWARG_CHECKS[name](name, value) if name in _RUNNER_KWARG_CHECKS else value
        for name, value in kwargs.items()
    }
