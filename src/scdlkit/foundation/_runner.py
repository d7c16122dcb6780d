"""The annotation runner: prepare once, split once, read the checkpoint once, fit each strategy,
rank them on validation data, keep the best, and label new data with it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdlkit._shared.labels import UNKNOWN_LABEL
from scdlkit._shared.persist import claim_run_folder, publish_files
from scdlkit._shared.provenance import check_unique_genes
from scdlkit._shared.run_files import run_file_names, write_run_files
from scdlkit._shared.strategies import DEFAULT_STRATEGIES
from scdlkit._shared.validation import gene_names
from scdlkit.foundation._comparison import (
    calibration_curve,
    compare_strategies,
    fit_strategies,
    repeat_splits,
    split_summary,
)
from scdlkit.foundation._data import MIN_GENE_OVERLAP, ScGPTPreparedData, prepare_preflighted
from scdlkit.foundation._device import resolve_device, resolve_precision
from scdlkit.foundation._embed import encode_cells
from scdlkit.foundation._final_model import kept_models
from scdlkit.foundation._fitting import (
    FitContext,
    PredictInputs,
    Stopwatch,
    StrategyResult,
    expression_of,
    flag_without_expression,
    label_predictions,
    query_cells_without_expression,
    read_once,
)
from scdlkit.foundation._inspect import (
    ScGPTAnnotationDataReport,
    inspect_annotation_data,
    preflight_data,
    preflight_report,
)
from scdlkit.foundation._normalisation import describe_normalisation
from scdlkit.foundation._runner_args import (
    ANNOTATE_ARGUMENTS,
    LOAD_ARGUMENTS,
    PREDICT_ARGUMENTS,
    SHORTCUTS,
    check_recipe_for_model,
    check_rows,
    check_runner_arguments,
    check_validation_cells,
    recorded_arguments,
)
from scdlkit.foundation._runner_io import load_kept, load_runner, save_runner
from scdlkit.foundation._selection import batch_metrics
from scdlkit.foundation._stream import encode_adata
from scdlkit.foundation._training_settings import resolve_training
from scdlkit.foundation.models import model_card, resolve_model_checkpoint
from scdlkit.foundation.models._contract import ModelCheckpoint
from scdlkit.foundation.strategies import strategy_family
from scdlkit.training._checks import check_adata, check_arguments, check_path

__all__ = ["ScGPTAnnotationRunner"]

logger = logging.getLogger("scdlkit")


class ScGPTAnnotationRunner:
    """Fit and compare ways of adapting scGPT to labelled cells; keep the best; label new data.

    Lifecycle: :meth:`fit` inspects the data, tokenises it once, splits it once, reads the
    checkpoint once, computes frozen ``<cls>`` features once (for ``frozen_probe`` and ``head``),
    fits every strategy, ranks them by validation macro-F1 (then balanced accuracy, accuracy,
    fewer trainable parameters, shorter runtime) and keeps the best. :meth:`predict` and
    :meth:`annotate_adata` then label any AnnData with matching genes; :meth:`save` and
    :meth:`load` persist it.

    Parameters
    ----------
    label_key
        ``adata.obs`` column with cell types; missing values mark unlabelled cells.
    checkpoint
        Official scGPT checkpoint name (found in the local cache) or a checkpoint folder.
    strategies
        Any of ``"frozen_probe"`` (logistic regression on frozen ``<cls>`` features),
        ``"head"`` (classifier head on the frozen encoder), ``"full_finetune"``, ``"lora"``,
        ``"adapter"``, ``"prefix_tuning"``, ``"ia3"`` and ``"baseline"`` (logistic regression
        on log-normalised expression, no scGPT).
    strategy_configs
        ``{strategy: config}`` for the parameter-efficient strategies
        (:class:`~scdlkit.foundation.LoRAConfig`, ... or dicts of their fields).
    lora_config
        Legacy alias for ``strategy_configs={"lora": ...}``; not both.
    batch_size
        Cells per batch for training and inference.
    val_size, test_size
        Fractions of labelled cells held out for model selection and for the final report.
    random_state
        Seeds splits, tokenisation ties, model initialisation and training.
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or a torch device string.
    output_dir
        Folder for artifacts (``strategy_metrics.csv``, ``predictions.csv``, ``report.md``, PNG
        plots) and the saved runner (``output_dir/runner``). Checked before any work: it must be
        writable, and a folder that already holds a run is refused unless ``overwrite=True``.
    overwrite
        Replace a run already in ``output_dir`` (default: refuse it; choose a fresh folder).
    gene_key, layer
        Where gene symbols and values are (default ``var_names`` and ``X``).
    training
        Overrides of the training settings: setting names (apply to all strategies) and/or
        strategy names mapping to dicts, e.g. ``{"lora": {"epochs": 20}}``. Settings: epochs,
        min_steps, max_steps (optimiser steps at least and at most; an explicit ``epochs`` alone
        lifts both), max_patience_steps (the most steps early stopping waits in a run the floor
        stretched), eval_every (long epochs are evaluated every this many steps), lr, head_lr,
        weight_decay, warmup, lr_decay, grad_clip, early_stopping_patience, monitor,
        class_weight, optimizer, adam_eps, encoder_dropout (encoder-trained strategies);
        ``frozen_probe`` and ``baseline`` take class_weight only. Defaults:
        :data:`~scdlkit.foundation._training_settings.DEFAULT_TRAINING`.
    epochs, lr, early_stopping_patience, class_weight
        Shortcuts for the same settings, applied to every neural strategy when given;
        ``class_weight="balanced"`` weights the ``frozen_probe`` and ``baseline`` logistic
        regressions too, so every strategy ranked on macro-F1 is weighted alike.
    precision
        ``"auto"`` (bf16 where the hardware runs it natively: recent CUDA GPUs, CPUs with AMX or
        AVX512-BF16; fp32 elsewhere), ``"fp32"`` or ``"bf16"``; the precision used is recorded in
        ``params()["precision_used"]`` and the manifest.
    confidence_threshold
        Cells whose top probability is below it are labelled ``"Unknown"`` in predictions.
    batch_key
        ``adata.obs`` column with the batch, donor or study of each cell: carried through,
        reported by the preflight, and used for per-batch test metrics (``batch_metrics_``).
    split_by
        ``"cells"`` (stratified by label) or ``"batch"``: whole batches held out for test (and
        validation), so metrics say how well an unseen batch is labelled.
    test_batches, val_batches
        Batches to hold out by name with ``split_by="batch"`` (default: drawn with
        ``random_state``).
    attention_dropout
        Dropout on attention weights while training, over the ``encoder_dropout`` training
        setting (default 0: the encoder trains without dropout); ``None`` leaves that setting.
    n_repeats
        Fit every strategy this many times (seeds ``random_state``, ``random_state + 1``, ...)
        on one outer test set, fixed by the first repeat: later repeats redraw only the training
        and validation cells, so no test cell is ever a validation cell. ``strategy_metrics_``
        then holds means with ``<column>_sd`` beside each metric and a corrected 95% t interval
        of test macro-F1 (``_t_ci_low``/``_high``), ``repeat_metrics_`` one row per strategy
        and repeat. The best strategy has the highest mean validation macro-F1; the kept model,
        ``split_``, batch metrics and labels are those of the first repeat. With one repeat,
        test macro-F1 carries a bootstrap 95% interval over the test cells
        (``_boot_ci_low``/``_high``).
    calibration_size
        Share of the labelled cells, taken from the training cells (stratified), that neither
        train nor choose a strategy: every strategy's conformal prediction sets are calibrated
        on them (``sck.tl.annotate(..., error_rate=)``; coverage and set size in
        ``strategy_metrics_``). ``0`` calibrates nothing.
    calibration_batches
        Calibrate on every training cell of these batches instead (``batch_key=`` needed): the
        sets then hold for cells of batches (donors) the model never trained on, as far as
        these batches represent the spread between batches (name several; one batch gives a
        warning); not test or validation batches.
    refit
        After selection, fit the kept model again on every labelled cell (CellTypist's practice):
        ``"auto"`` for the closed-form strategies (``frozen_probe``, ``baseline``), ``"always"``
        also for the trained ones (for the optimiser steps of their kept weights, no early
        stopping), ``"never"``. The reported metrics stay those of the held-out evaluation;
        ``final_models_`` says what each kept model was fitted on.
    keep
        ``"best"`` keeps the selected strategy's model; ``"all"`` keeps every strategy's (saved
        beside it), so ``predict(..., strategy=...)`` and ``sck.tl.annotate(..., strategy=...)``
        label with any of them without training again.
    progress
        Show progress bars.

    Attributes
    ----------
    best_strategy_
        Name of the kept strategy.
    strategy_metrics_
        DataFrame, one row per strategy: validation/test accuracy, macro-F1, balanced accuracy,
        AUROC (one-vs-rest), trainable parameters, runtime.
    label_categories_
        Class names in code order.
    history_
        ``{strategy: per-epoch DataFrame}`` for trained strategies.
    report_
        The preflight :class:`~scdlkit.foundation.ScGPTAnnotationDataReport`.
    split_
        The :class:`~scdlkit.foundation.ScGPTSplitData` used.
    final_models_
        ``{strategy: record}`` for every kept model: ``fitted_on`` (``"training cells"``, or
        after a refit ``"all labelled cells"``, less ``"the calibration cells"`` or ``"those of
        the calibration batches"`` when there are any), ``n_cells``, ``refit`` and, for a
        refitted trained strategy, ``steps``.

    Examples
    --------
    >>> runner = sck.AnnotationRunner(label_key="cell_type", strategies=("frozen_probe", "lora"))
    >>> runner.fit(adata)  # doctest: +SKIP
    >>> runner.strategy_metrics_  # doctest: +SKIP
    >>> runner.annotate_adata(query)  # doctest: +SKIP
    >>> runner.save("runs/pbmc/runner")  # doctest: +SKIP
    """

    def __init__(
        self,
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
        overwrite: bool = False,
        gene_key: str | None = None,
        layer: str | None = None,
        training: Mapping[str, Any] | None = None,
        epochs: int | None = None,
        lr: float | None = None,
        early_stopping_patience: int | None = None,
        class_weight: str | None = None,
        precision: str = "auto",
        confidence_threshold: float | None = None,
        attention_dropout: float | None = None,
        batch_key: str | None = None,
        split_by: str = "cells",
        test_batches: Sequence[str] | None = None,
        val_batches: Sequence[str] | None = None,
        n_repeats: int = 1,
        calibration_size: float = 0.1,
        calibration_batches: Sequence[str] | None = None,
        refit: str = "auto",
        keep: str = "best",
        progress: bool = True,
    ) -> None:
        # every argument checked before any work; canonical values from here on
        checked = check_runner_arguments({k: v for k, v in locals().items() if k != "self"})
        self.progress = checked.pop("progress")  # shapes no result: not recorded
        self.init_params_ = recorded_arguments(checked)
        self.shortcuts = {name: checked.pop(name) for name in SHORTCUTS}
        for name, value in checked.items():  # every other argument under its own name
            setattr(self, name, value)
        self.output_dir = None if output_dir is None else Path(output_dir).resolve()
        self._fitted = False
        self.runner_dir_: Path | None = None

    # ----------------------------------------------------------------------------- helpers

    @property
    def model_title(self) -> str:
        """Display name of the foundation model (``"scGPT"``, ``"Geneformer"``); a runner
        loaded without its checkpoint (a kept baseline) says ``"scGPT"``, its API's name."""
        ckpt = getattr(self, "checkpoint_", None)
        return "scGPT" if ckpt is None else model_card(ckpt).title

    @property
    def torch_device(self) -> torch.device:
        """The torch device ``device`` resolves to on this machine."""
        return resolve_device(self.device)

    def _require_fitted(self, what: str) -> None:
        if not self._fitted:
            msg = f"{what} needs a fitted runner: call fit(adata) first (or AnnotationRunner.load)."
            raise RuntimeError(msg)

    def params(self) -> dict[str, Any]:
        """Every argument that shapes the result, as plain JSON-ready values.

        The constructor's arguments as recorded in ``init_params_`` (the same for a runner and
        the same runner saved and loaded), with the checkpoint resolved, the training settings
        each neural strategy uses, and the precision used.
        """
        ckpt = getattr(self, "checkpoint_", None)
        recorded = dict(self.init_params_)
        # a loaded baseline runner never needed its checkpoint: the saved name and path stand
        name, path = getattr(self, "saved_checkpoint_", (recorded["checkpoint"], ""))
        for shortcut in ("training", *SHORTCUTS):
            recorded.pop(shortcut)
        return {
            **recorded,
            "checkpoint": ckpt.name if ckpt is not None else name,
            "checkpoint_path": str(ckpt.path) if ckpt is not None else path,
            "gene_key": self.gene_key or "",
            "layer": self.layer or "",
            "training": {s: self.training_settings(s) for s in self.strategies},
            "precision_used": resolve_precision(self.precision, self.torch_device),
        }

    def training_settings(self, strategy: str) -> dict[str, Any]:
        """The resolved training settings of one neural strategy.

        Parameters
        ----------
        strategy
            One of the trained strategies (``head``, ``full_finetune``, ``lora``, ...).

        Returns
        -------
        dict
            Defaults, overridden by ``training=`` and the shortcut arguments.

        Examples
        --------
        >>> sck.AnnotationRunner(label_key="cell_type", lr=1e-3).training_settings("lora")["lr"]
        0.001
        """
        return resolve_training(strategy, self.training, self.shortcuts)

    # ---------------------------------------------------------------------------- lifecycle

    def inspect(self, adata: Any) -> ScGPTAnnotationDataReport:
        """Preflight the data (no weights read); also stored as ``report_``.

        Parameters
        ----------
        adata
            The reference AnnData.

        Returns
        -------
        ScGPTAnnotationDataReport
            See :func:`~scdlkit.foundation.inspect_annotation_data`.

        Examples
        --------
        >>> runner.inspect(adata).ok  # doctest: +SKIP
        """
        check_adata("adata", adata)
        self.report_ = inspect_annotation_data(
            adata,
            label_key=self.label_key,
            checkpoint=self.checkpoint,
            gene_key=self.gene_key,
            layer=self.layer,
            batch_key=self.batch_key,
        )
        return self.report_

    def fit(self, adata: Any) -> ScGPTAnnotationRunner:
        """Fit every strategy on ``adata`` and keep the best (see the class docstring).

        Parameters
        ----------
        adata
            Labelled reference cells (raw counts or log-normalised, gene symbols). Not modified.

        Returns
        -------
        The fitted runner.
        """
        check_adata("adata", adata)
        check_validation_cells(self.strategies, self.val_size, self.split_by, self.val_batches)
        ckpt, names = resolve_model_checkpoint(self.checkpoint), gene_names(adata, self.gene_key)
        check_recipe_for_model(self.training, model_card(ckpt))
        model_card(ckpt).check_gene_names(names, ckpt, self.gene_key)
        if not all(strategy_family(name).uses_checkpoint for name in self.strategies):
            check_unique_genes(names, gene_key=self.gene_key)  # the baseline reads every gene
        if self.output_dir is None:
            return self._fit(adata, ckpt)
        # before any work: the folder is writable, holds no other run, and is ours until done
        run_files = ("runner", *run_file_names())  # any of them there: the folder holds a run
        with claim_run_folder(self.output_dir, overwrite=self.overwrite, run_files=run_files):
            return self._fit(adata, ckpt)

    def _fit(self, adata: Any, ckpt: ModelCheckpoint) -> ScGPTAnnotationRunner:
        families = {name: strategy_family(name) for name in self.strategies}
        self.runner_dir_ = self.manifest_sha256_ = None  # a refit is no earlier save's model
        self.checkpoint_ = ckpt  # resolved once, in fit
        # the preflight first; tokenising reuses its gene match, labels and batches, and the
        # tokens count each cell's matched genes for its report (no second pass over the data)
        preflight = preflight_data(
            adata,
            label_key=self.label_key,
            checkpoint=self.checkpoint_,
            gene_key=self.gene_key,
            layer=self.layer,
            batch_key=self.batch_key,
        )
        self.prepared_ = prepare_preflighted(
            adata,
            preflight,
            batch_size=self.batch_size,
            random_state=self.random_state,
            progress=self.progress,
        )
        self.report_ = preflight_report(preflight, self.prepared_.tokens.n_genes_per_cell)
        self.label_categories_ = list(self.prepared_.label_categories)
        self.matched_genes_ = list(self.prepared_.matched_genes)
        self.normalisation_ = describe_normalisation(adata, self.layer)  # annotate compares
        if self.confidence_threshold is not None and UNKNOWN_LABEL in self.label_categories_:
            msg = (
                f"a class is named {UNKNOWN_LABEL!r}, the label confidence_threshold gives unsure "
                "cells: rename that class, or leave confidence_threshold=None."
            )
            raise ValueError(msg)
        splits = repeat_splits(
            self.prepared_,
            n_repeats=self.n_repeats,
            n_strategies=len(self.strategies),
            random_state=self.random_state,
            val_size=self.val_size,
            test_size=self.test_size,
            split_by=self.split_by,
            test_batches=self.test_batches,
            val_batches=self.val_batches,
            calibration_size=self.calibration_size,
            calibration_batches=self.calibration_batches,
        )
        self.split_ = splits[0]
        self.split_summary_ = split_summary(
            self.split_,
            self.prepared_,
            batch_key=self.batch_key,
            random_state=self.random_state,
            val_size=self.val_size,
            test_size=self.test_size,
        )
        self._base_encoder = None
        encoder_state = None
        if any(f.uses_checkpoint for f in families.values()):
            encoder_state = model_card(self.checkpoint_).read_weights(self.checkpoint_)
            self._base_encoder = self._build_base_encoder(encoder_state)
        features, feature_seconds = None, 0.0
        if any(f.reads_features for f in families.values()):
            with Stopwatch() as watch:
                features = self._encode_base(self.prepared_)
            feature_seconds = watch.seconds
        self._features = features
        self._expression = read_once(lambda: expression_of(adata, self.gene_key, self.layer))
        repeats, contexts = [], []
        for r, split in enumerate(splits):
            ctx = FitContext(
                prepared=self.prepared_,
                split=split,
                label_categories=self.label_categories_,
                checkpoint=self.checkpoint_,
                encoder_state=encoder_state,
                features=features,
                expression=self._expression,
                device=self.torch_device,
                precision=self.precision,
                batch_size=self.batch_size,
                random_state=self.random_state + r,
                attention_dropout=self.attention_dropout,
                progress=self.progress,
                confidence_threshold=self.confidence_threshold,
                early_stopping_fraction=self.val_size,
            )
            results = fit_strategies(
                families,
                ctx,
                settings=self.training_settings,
                configs=self.strategy_configs,
                feature_seconds=feature_seconds,
            )
            if r > 0:  # only the first repeat's models can be kept
                for result in results.values():
                    result.model = None
            repeats.append(results)
            contexts.append(ctx)
        self._finish_fit(repeats)
        # the reference's labels come from the selected fit: its test cells stay held out; a
        # cell with no gene the model reads is unknown here as in predict (one cell, one label)
        family = strategy_family(self.best_strategy_)
        silent = (  # the tokens already count each cell's readable genes: no second pass
            self.prepared_.tokens.n_genes_per_cell == 0
            if family.uses_checkpoint
            else query_cells_without_expression(
                adata,
                self.gene_key,
                self.layer,
                family=family,
                checkpoint=None,
                model=self._best.model,
            )
        )
        self._reference_predictions = flag_without_expression(
            self._predict_prepared(self.prepared_), silent, UNKNOWN_LABEL
        )
        self._keep_final_models(repeats[0], contexts[0], families)
        self._expression = None  # the reference matrix is not kept beyond fit
        if self.output_dir is not None:
            self.save(self.output_dir / "runner")
            publish_files(
                self.output_dir,
                lambda staging: write_run_files(self, staging),
                marker={"runner_manifest_sha256": self.manifest_sha256_},
            )
        return self

    def _finish_fit(self, repeats: list[dict[str, StrategyResult]]) -> None:
        """Rank on the mean over repeats; the first repeat's best model predicts from here."""
        results = repeats[0]
        self.results_ = results
        self.strategy_metrics_, self.repeat_metrics_, self.best_strategy_ = compare_strategies(
            repeats,
            self.prepared_.label_codes[self.split_.indices("test")],
            random_state=self.random_state,
            held_out_ratio=len(self.split_.val_indices) / max(len(self.split_.train_indices), 1),
        )
        self.history_ = {s: r.history for s, r in results.items() if r.history is not None}
        self.calibration_curve_ = calibration_curve(
            results, self.prepared_.label_codes[self.split_.indices("test")]
        )
        self.batch_metrics_ = None
        if self.batch_key:
            cells = self.split_.indices("test")
            self.batch_metrics_ = batch_metrics(
                {name: r.extra.get("test_probabilities") for name, r in results.items()},
                self.prepared_.label_codes[cells],
                self.prepared_.batches[cells],
            )
        self._best = results[self.best_strategy_]
        self._kept = {self.best_strategy_: self._best}
        self._fitted = True

    def _keep_final_models(
        self, results: dict[str, StrategyResult], ctx: FitContext, families: dict
    ) -> None:
        """Keep the best model (or every one), refitted on every labelled cell where ``refit``
        says: the models :meth:`predict` labels new cells with."""
        self._kept, self.final_models_ = kept_models(
            results,
            self.best_strategy_,
            families,
            ctx,
            refit=self.refit,
            keep=self.keep,
            settings=self.training_settings,
            configs=self.strategy_configs,
        )
        for name, result in results.items():  # the selection fits of kept strategies stay
            if name not in self._kept:
                result.model = None
        self._best = self._kept[self.best_strategy_]
        self.kept_strategies_ = list(self._kept)

    # ----------------------------------------------------------------------------- encoders

    def _build_base_encoder(self, state: dict[str, torch.Tensor]) -> Any:
        card = model_card(self.checkpoint_)
        base = card.build(self.checkpoint_)
        base.load_report = card.load_weights(base, state)
        base.checkpoint = self.checkpoint_
        logger.info("%s checkpoint %s: %s", card.title, self.checkpoint_.name, base.load_report)
        return base.to(self.torch_device).eval()

    def frozen_encoder(self) -> Any:
        """The pretrained encoder for ``<cls>`` features: the kept model's, or built once."""
        if self._base_encoder is None:
            held = strategy_family(self.best_strategy_).encoder_of(self._best.model)
            self._base_encoder = (
                held.to(self.torch_device).eval()
                if held is not None
                else self._build_base_encoder(
                    model_card(self.checkpoint_).read_weights(self.checkpoint_)
                )
            )
        return self._base_encoder

    def _encode_tokens(self, tokens: Any, forward: Any, desc: str) -> np.ndarray:
        return encode_cells(
            tokens,
            forward,
            device=self.torch_device,
            batch_size=self.batch_size,
            precision=self.precision,
            progress=self.progress,
            desc=desc,
        )

    def _encode_base(self, prepared: ScGPTPreparedData) -> np.ndarray:
        encoder = self.frozen_encoder()
        return self._encode_tokens(
            prepared.tokens,
            lambda b: encoder.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
            "<cls> features",
        )

    # ----------------------------------------------------------------------------- predict

    def _predict_with(
        self,
        encode: Any,
        expression: Any,
        features: np.ndarray | None = None,
        strategy: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Labels, probabilities and latent of a kept strategy (default: the best).

        ``encode(forward, desc)`` runs a batch function over every cell (tokens already in
        memory, or streamed from the AnnData); ``expression()`` reads the log-normalised matrix
        and gene names; ``features`` are precomputed ``<cls>`` outputs.
        """

        def cls_features() -> np.ndarray:
            if features is not None:
                return features
            encoder = self.frozen_encoder()
            return encode(
                lambda b: encoder.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
                "<cls> features",
            )

        inputs = PredictInputs(
            encode=encode,
            cls_features=cls_features,
            expression=expression,
            device=self.torch_device,
            n_classes=len(self.label_categories_),
        )
        kept = self.kept_result(strategy)
        probabilities, latent = strategy_family(kept.strategy).predict(kept.model, inputs)
        return label_predictions(
            probabilities, latent, self.label_categories_, self.confidence_threshold, UNKNOWN_LABEL
        )

    def _predict_prepared(self, prepared: ScGPTPreparedData) -> dict[str, np.ndarray]:
        """Predictions for the reference cells, reusing their tokens, features and matrix."""

        def encode(forward: Any, desc: str) -> np.ndarray:
            return self._encode_tokens(prepared.tokens, forward, desc)

        return self._predict_with(encode, self._expression, features=self._features)

    def predict(
        self,
        adata: Any,
        *,
        gene_key: str | None = None,
        layer: str | None = None,
        chunk_size: int | None = None,
        strategy: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Label cells with the best strategy (or another kept one).

        Parameters
        ----------
        adata
            Cells with gene symbols (any genes; those in the vocabulary are used). Not modified.
        gene_key, layer
            Override where the query's gene symbols and values are (default: as in ``fit``).
        chunk_size
            Cells read, tokenised and predicted at a time (default: all of an in-memory AnnData,
            50,000 of a backed one), so memory is bounded by the chunk. Under a
            ``torch.distributed`` launch each process predicts a share of every chunk and all
            receive the results in cell order.
        strategy
            A strategy kept with ``keep="all"`` (default: the best one).

        Returns
        -------
        dict
            ``label_codes`` (int, -1 for ``"Unknown"``), ``labels`` (str), ``probabilities``
            ``(n_cells, n_classes)``, ``latent`` (the best model's cell representation,
            L2-normalised for scGPT strategies as :func:`scdlkit.tl.embed`).
        """
        self._require_fitted("predict")
        arguments = {
            "adata": adata,
            "gene_key": gene_key,
            "layer": layer,
            "chunk_size": chunk_size,
            "strategy": strategy,
        }
        check_arguments(PREDICT_ARGUMENTS, arguments)
        kept = self.kept_result(strategy)
        gene_key = self.gene_key if gene_key is None else gene_key
        layer = self.layer if layer is None else layer
        # the expression baseline reads every gene; a foundation model those it can read
        names = gene_names(adata, gene_key)
        if self.checkpoint_ is not None and strategy_family(kept.strategy).uses_checkpoint:
            model_card(self.checkpoint_).check_gene_names(names, self.checkpoint_, gene_key)
        else:
            check_unique_genes(names, gene_key=gene_key)
        silent = query_cells_without_expression(
            adata,
            gene_key,
            layer,
            family=strategy_family(kept.strategy),
            checkpoint=self.checkpoint_,
            model=kept.model,
        )

        def encode(forward: Any, desc: str) -> np.ndarray:
            return encode_adata(
                adata,
                self.checkpoint_,
                forward,
                device=self.torch_device,
                gene_key=gene_key,
                layer=layer,
                batch_size=self.batch_size,
                precision=self.precision,
                seed=self.random_state,
                chunk_size=chunk_size,
                min_gene_overlap=MIN_GENE_OVERLAP,
                progress=self.progress,
                desc=desc,
            )[0]

        predictions = self._predict_with(
            encode, read_once(lambda: expression_of(adata, gene_key, layer)), strategy=strategy
        )
        return flag_without_expression(predictions, silent, UNKNOWN_LABEL)

    def restore_fitted(self, best: StrategyResult) -> None:
        """Take ``best`` as the kept model of a runner read from disk (no features cached)."""
        self._features, self._base_encoder = None, None
        self._best, self._kept, self._fitted = best, {best.strategy: best}, True

    def kept_result(self, strategy: str | None = None) -> StrategyResult:
        """The kept model of ``strategy`` (default: the best), read from the saved runner's
        ``strategies/`` folder on first use."""
        name = self.best_strategy_ if strategy is None else strategy
        if name not in self._kept:
            self._kept[name] = load_kept(self, name)
        return self._kept[name]

    def conformal_calibration(self, strategy: str | None = None) -> Any:
        """The conformal calibration of a kept model (default: the best), for prediction sets
        with a stated error rate (:class:`~scdlkit.foundation._conformal.ConformalCalibration`).
        """
        kept = self.kept_result(strategy)
        calibration = kept.extra.get("conformal")
        if calibration is None:
            msg = (
                f"the {kept.strategy!r} model has no conformal calibration: it was fitted with "
                "calibration_size=0 and no calibration_batches (or saved before scdlkit had "
                "calibration). Fit again with calibration_size > 0 (default 0.1) for error_rate=."
            )
            raise ValueError(msg)
        return calibration

    def reference_predictions(self) -> dict[str, np.ndarray]:
        """Predictions for the cells ``fit`` saw (computed once, features reused)."""
        self._require_fitted("reference_predictions")
        return self._reference_predictions

    def annotate_adata(
        self,
        adata: Any,
        *,
        obs_key: str = "scgpt_label",
        embedding_key: str = "X_scgpt_best",
        predictions: dict[str, np.ndarray] | None = None,
    ) -> Any:
        """Write predicted labels, confidence and the latent into ``adata`` (in place).

        Parameters
        ----------
        adata
            Cells to label (any AnnData with gene symbols).
        obs_key
            Writes ``obs[obs_key]`` (categorical) and ``obs[f"{obs_key}_confidence"]``.
        embedding_key
            Writes ``obsm[embedding_key]`` (the best model's cell representation).
        predictions
            Output of :meth:`predict` for ``adata``, to avoid predicting twice.

        Returns
        -------
        AnnData
            ``adata`` itself.

        Examples
        --------
        >>> runner.annotate_adata(query)  # doctest: +SKIP
        >>> query.obs["scgpt_label"].value_counts()  # doctest: +SKIP
        """
        arguments = {
            "adata": adata,
            "obs_key": obs_key,
            "embedding_key": embedding_key,
            "predictions": predictions,
        }
        self._require_fitted("annotate_adata")
        check_arguments(ANNOTATE_ARGUMENTS, arguments)
        predictions = self.predict(adata) if predictions is None else predictions
        check_rows(predictions, adata.n_obs)  # before anything is written
        categories = list(self.label_categories_)
        if self.confidence_threshold is not None or (predictions["label_codes"] < 0).any():
            categories.append(UNKNOWN_LABEL)
        adata.obs[obs_key] = pd.Categorical(predictions["labels"], categories=categories)
        adata.obs[f"{obs_key}_confidence"] = predictions["probabilities"].max(axis=1)
        adata.obsm[embedding_key] = predictions["latent"]
        return adata

    # ------------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Save atomically: ``manifest.json`` plus ``weights-<hash>.safetensors`` (no pickle).

        Only what the base checkpoint does not hold is written (head, PEFT parameters, probe
        coefficients; the whole encoder only for ``full_finetune``). An interrupted save leaves
        the previous one in ``path`` intact.

        Parameters
        ----------
        path
            Folder to write (created if needed).

        Returns
        -------
        Path
            The folder.

        Examples
        --------
        >>> runner.save("runs/pbmc/runner")  # doctest: +SKIP
        """
        self._require_fitted("save")
        check_path("path", path)
        self.runner_dir_ = save_runner(self, Path(path))
        return self.runner_dir_

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        verify_checkpoint: bool = True,
    ) -> ScGPTAnnotationRunner:
        """Rebuild a saved runner; it predicts exactly what the saved one predicted.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        checkpoint
            Base checkpoint (default: the one recorded in the manifest, by path then name).
        device
            Where to run.
        verify_checkpoint
            Refuse a base checkpoint whose ``best_model.pt`` hash differs from the recorded one.
        """
        arguments = {
            "path": path,
            "checkpoint": checkpoint,
            "device": device,
            "verify_checkpoint": verify_checkpoint,
        }
        check_arguments(LOAD_ARGUMENTS, arguments)
        return load_runner(
            cls, Path(path), checkpoint=checkpoint, device=device, verify=verify_checkpoint
        )

    def __repr__(self) -> str:
        state = f"best={self.best_strategy_!r}" if self._fitted else "not fitted"
        return f"ScGPTAnnotationRunner(strategies={list(self.strategies)}, {state})"
