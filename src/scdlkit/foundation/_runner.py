"""The annotation runner: prepare once, split once, read the checkpoint once, fit each strategy,
rank them on validation data, keep the best, and label new data with it."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdlkit.foundation._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation._data import (
    MIN_GENE_OVERLAP,
    ScGPTPreparedData,
    prepare_scgpt_data,
    split_scgpt_data,
)
from scdlkit.foundation._device import resolve_device, resolve_precision
from scdlkit.foundation._embed import encode_cells
from scdlkit.foundation._inspect import ScGPTAnnotationDataReport, inspect_annotation_data
from scdlkit.foundation._model import set_attention_dropout
from scdlkit.foundation._strategies import (
    FEATURE_STRATEGIES,
    NEURAL_STRATEGIES,
    STRATEGIES,
    FeatureDataset,
    Stopwatch,
    StrategyResult,
    check_training_overrides,
    rank_key,
    resolve_training,
    softmax,
)

__all__ = ["ScGPTAnnotationRunner", "adapt_scgpt_annotation"]

logger = logging.getLogger("scdlkit")

UNKNOWN_LABEL = "Unknown"
METRIC_NAMES = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr")


def _check_strategies(
    strategies: Sequence[str],
    strategy_configs: Mapping[str, Any] | None,
    lora_config: Any,
) -> tuple[tuple[str, ...], dict[str, Any]]:
    if isinstance(strategies, str):
        strategies = (strategies,)
    strategies = tuple(strategies)
    if not strategies:
        msg = f"strategies is empty; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        msg = f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    if len(set(strategies)) != len(strategies):
        msg = f"strategies lists a strategy twice: {strategies}."
        raise ValueError(msg)
    if strategy_configs is not None and lora_config is not None:
        msg = (
            "pass either strategy_configs= or the legacy lora_config=, not both "
            "(use strategy_configs={'lora': ...})."
        )
        raise ValueError(msg)
    configs = dict(strategy_configs or {})
    if lora_config is not None:
        configs = {"lora": lora_config}
    for name in configs:
        if name not in strategies:
            msg = (
                f"a config was given for strategy {name!r}, which is not in strategies="
                f"{strategies}; add it to strategies or drop its config."
            )
            raise ValueError(msg)
    from scdlkit.foundation._peft import resolve_strategy_config

    return strategies, {
        name: resolve_strategy_config(name, config) for name, config in configs.items()
    }


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
        plots) and the saved runner (``output_dir/runner``).
    gene_key, layer
        Where gene symbols and values are (default ``var_names`` and ``X``).
    training
        Overrides of the training settings: setting names (apply to all strategies) and/or
        strategy names mapping to dicts, e.g. ``{"lora": {"epochs": 20}}``. Settings: epochs, lr,
        weight_decay, warmup, lr_decay, grad_clip, early_stopping_patience, monitor,
        class_weight. Defaults: :data:`~scdlkit.foundation._strategies.DEFAULT_TRAINING`.
    epochs, lr, early_stopping_patience, class_weight
        Shortcuts for the same settings, applied to every neural strategy when given.
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
        Dropout on attention weights while training; ``None`` keeps the checkpoint's ``dropout``
        as upstream does. ``0.0`` is several times faster on CPU (no fused kernel with dropout).
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
        checkpoint: str | os.PathLike | ScGPTCheckpoint = "whole-human",
        strategies: Sequence[str] = ("frozen_probe", "head"),
        strategy_configs: Mapping[str, Any] | None = None,
        lora_config: Any = None,
        batch_size: int = 64,
        val_size: float = 0.15,
        test_size: float = 0.15,
        random_state: int = 42,
        device: str = "auto",
        output_dir: str | os.PathLike | None = None,
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
        progress: bool = True,
    ) -> None:
        self.strategies, self.strategy_configs = _check_strategies(
            strategies, strategy_configs, lora_config
        )
        check_training_overrides(training)
        if batch_size < 1:
            msg = f"batch_size={batch_size} must be at least 1."
            raise ValueError(msg)
        if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
            msg = f"confidence_threshold={confidence_threshold} must be in [0, 1] or None."
            raise ValueError(msg)
        if precision not in {"auto", "fp32", "bf16"}:
            msg = f"precision={precision!r}; choose 'auto', 'fp32' or 'bf16'."
            raise ValueError(msg)
        self.label_key = label_key
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.random_state = random_state
        self.device = device
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.gene_key = gene_key
        self.layer = layer
        self.training = dict(training or {})
        self.shortcuts = {
            "epochs": epochs,
            "lr": lr,
            "early_stopping_patience": early_stopping_patience,
            "class_weight": class_weight,
        }
        self.precision = precision
        self.confidence_threshold = confidence_threshold
        self.attention_dropout = attention_dropout
        if split_by not in {"cells", "batch"}:
            msg = f"split_by={split_by!r}; choose 'cells' or 'batch'."
            raise ValueError(msg)
        if split_by == "batch" and batch_key is None:
            msg = "split_by='batch' needs batch_key= naming the adata.obs column of batches."
            raise ValueError(msg)
        self.batch_key = batch_key
        self.split_by = split_by
        self.test_batches = None if test_batches is None else [str(b) for b in test_batches]
        self.val_batches = None if val_batches is None else [str(b) for b in val_batches]
        self.progress = progress
        self._fitted = False
        self.runner_dir_: Path | None = None

    # ----------------------------------------------------------------------------- helpers

    @property
    def _torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def _require_fitted(self, what: str) -> None:
        if not self._fitted:
            msg = f"{what} needs a fitted runner: call fit(adata) first (or AnnotationRunner.load)."
            raise RuntimeError(msg)

    def params(self) -> dict[str, Any]:
        """Every argument that shapes the result, as plain JSON-ready values."""
        ckpt = getattr(self, "checkpoint_", None)
        return {
            "label_key": self.label_key,
            "checkpoint": ckpt.name if ckpt is not None else str(self.checkpoint),
            "checkpoint_path": str(ckpt.path) if ckpt is not None else "",
            "strategies": list(self.strategies),
            "strategy_configs": {k: v.to_dict() for k, v in self.strategy_configs.items()},
            "batch_size": self.batch_size,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "random_state": self.random_state,
            "device": str(self.device),
            "gene_key": self.gene_key or "",
            "layer": self.layer or "",
            "training": {
                s: self.training_settings(s) for s in self.strategies if s in NEURAL_STRATEGIES
            },
            "precision": self.precision,
            "precision_used": resolve_precision(self.precision, self._torch_device),
            "confidence_threshold": self.confidence_threshold,
            "attention_dropout": self.attention_dropout,
            "batch_key": self.batch_key,
            "split_by": self.split_by,
            "test_batches": self.test_batches,
            "val_batches": self.val_batches,
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
        from scdlkit.foundation._loading import (
            build_encoder,
            load_encoder_weights,
            load_state_dict_file,
        )

        uses_scgpt = any(s != "baseline" for s in self.strategies)
        self.checkpoint_ = resolve_checkpoint(self.checkpoint)
        self.prepared_ = prepare_scgpt_data(
            adata,
            checkpoint=self.checkpoint_,
            label_key=self.label_key,
            gene_key=self.gene_key,
            layer=self.layer,
            batch_size=self.batch_size,
            batch_key=self.batch_key,
            random_state=self.random_state,
            progress=self.progress,
        )
        self.inspect(adata)
        self.label_categories_ = list(self.prepared_.label_categories)
        self.matched_genes_ = list(self.prepared_.matched_genes)
        self.split_ = split_scgpt_data(
            self.prepared_,
            val_size=self.val_size,
            test_size=self.test_size,
            random_state=self.random_state,
            split_by=self.split_by,
            test_batches=self.test_batches,
            val_batches=self.val_batches,
        )
        split = self.split_
        self.split_summary_ = {
            "split_by": split.split_by,
            "batch_key": self.batch_key or "",
            "test_batches": list(split.test_batches),
            "val_batches": list(split.val_batches),
            "random_state": self.random_state,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "stratified": split.stratified,
            "n_train": len(split.train_indices),
            "n_val": len(split.val_indices),
            "n_test": len(split.test_indices),
            "n_unlabelled": int((~self.prepared_.labelled).sum()),
            "small_classes": list(split.small_classes),
        }
        self._encoder_state = None
        self._base_encoder = None
        self._features = None
        if uses_scgpt:
            self._encoder_state = load_state_dict_file(self.checkpoint_.weights_path)
            base = build_encoder(self.checkpoint_)
            base.load_report = load_encoder_weights(base, self._encoder_state)
            base.checkpoint = self.checkpoint_
            self._base_encoder = base.to(self._torch_device).eval()
            logger.info("scGPT checkpoint %s: %s", self.checkpoint_.name, base.load_report)
        if any(s in FEATURE_STRATEGIES for s in self.strategies):
            with Stopwatch() as watch:
                self._features = self._encode_base(self.prepared_)
            self._feature_seconds = watch.seconds
        results = {}
        for strategy in self.strategies:
            logger.info("fitting strategy %s", strategy)
            results[strategy] = self._fit_strategy(strategy, adata)
        self.results_ = results
        rows = [self._metrics_row(r) for r in results.values()]
        ranked = sorted(rows, key=rank_key)
        self.best_strategy_ = ranked[0]["strategy"]
        self.strategy_metrics_ = pd.DataFrame(rows)
        self.history_ = {s: r.history for s, r in results.items() if r.history is not None}
        self.batch_metrics_ = self._batch_metrics(results) if self.batch_key else None
        for name, result in results.items():  # keep only the best model in memory
            if name != self.best_strategy_:
                result.model = None
        self._best = results[self.best_strategy_]
        self._fitted = True
        self._reference_predictions = self._predict_prepared(self.prepared_, adata)
        if self.output_dir is not None:
            from scdlkit._artifacts import write_artifacts

            self.save(self.output_dir / "runner")
            write_artifacts(self, self.output_dir)
        return self

    # ------------------------------------------------------------------------- strategies

    def _encode_base(self, prepared: ScGPTPreparedData) -> np.ndarray:
        encoder = self._base_encoder
        return encode_cells(
            prepared.tokens,
            lambda b: encoder.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
            device=self._torch_device,
            batch_size=self.batch_size,
            precision=self.precision,
            progress=self.progress,
            desc="<cls> features",
        )

    def _fit_strategy(self, strategy: str, adata: Any) -> StrategyResult:
        with Stopwatch() as watch:
            if strategy == "frozen_probe":
                result = self._fit_probe()
            elif strategy == "baseline":
                result = self._fit_baseline(adata)
            else:
                result = self._fit_neural(strategy)
        # feature strategies share one <cls> pass; each is charged for it, so runtimes compare
        shared = self._feature_seconds if strategy in FEATURE_STRATEGIES else 0.0
        result.runtime_sec = watch.seconds + shared
        return result

    def _labels(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        cells = self.split_.indices(name)
        return cells, self.prepared_.label_codes[cells]

    def _evaluate(self, proba_for: Any) -> tuple[dict[str, Any], np.ndarray | None]:
        """Metrics of each split and the test probabilities.

        ``proba_for(split, cells)`` gives the probabilities of that split's cells.
        """
        from scdlkit.training.metrics import classification_metrics

        out: dict[str, Any] = {}
        test_proba = None
        for split, prefix in (("val", "validation"), ("test", "test")):
            cells, labels = self._labels(split)
            if len(cells) == 0:
                out.update({f"{prefix}_{m}": None for m in METRIC_NAMES})
                continue
            proba = proba_for(split, cells)
            if split == "test":
                test_proba = proba
            metrics = classification_metrics(labels, proba, n_classes=len(self.label_categories_))
            out.update({f"{prefix}_{m}": metrics[m] for m in METRIC_NAMES})
        return out, test_proba

    def _fit_probe(self) -> StrategyResult:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        train, labels = self._labels("train")
        scaler = StandardScaler().fit(self._features[train])
        probe = LogisticRegression(max_iter=2000, C=1.0, random_state=self.random_state)
        probe.fit(scaler.transform(self._features[train]), labels)
        model = {"scaler": scaler, "probe": probe}
        n_classes = len(self.label_categories_)
        metrics, test_proba = self._evaluate(
            lambda _, cells: _probe_proba(model, self._features[cells], n_classes)
        )
        return StrategyResult(
            extra={"test_probabilities": test_proba},
            strategy="frozen_probe",
            metrics=metrics,
            trainable_parameters=int(probe.coef_.size + probe.intercept_.size),
            runtime_sec=0.0,
            model=model,
        )

    def _fit_baseline(self, adata: Any) -> StrategyResult:
        from scdlkit._shared.validation import gene_names
        from scdlkit.baselines._expression import ExpressionLogisticBaseline, log_normalised_matrix

        matrix = log_normalised_matrix(adata, self.layer)
        genes = gene_names(adata, self.gene_key)
        train, labels = self._labels("train")
        model = ExpressionLogisticBaseline(random_state=self.random_state).fit(
            matrix[train], genes, labels
        )
        n_classes = len(self.label_categories_)
        metrics, test_proba = self._evaluate(
            lambda _, cells: _full_proba(
                model.predict_proba(matrix[cells], genes), model, n_classes
            )
        )
        return StrategyResult(
            extra={"test_probabilities": test_proba},
            strategy="baseline",
            metrics=metrics,
            trainable_parameters=model.n_parameters,
            runtime_sec=0.0,
            model=model,
        )

    def _fit_neural(self, strategy: str) -> StrategyResult:
        from scdlkit.foundation._annotation_model import build_annotation_model
        from scdlkit.training import Trainer

        settings = self.training_settings(strategy)
        model = build_annotation_model(
            self._encoder_state,
            self.checkpoint_,
            num_classes=len(self.label_categories_),
            tuning_strategy=strategy,
            strategy_config=self.strategy_configs.get(strategy),
            label_categories=self.label_categories_,
            seed=self.random_state,
        )
        if self.attention_dropout is not None:
            set_attention_dropout(model, self.attention_dropout)
        trainer = Trainer(
            model,
            batch_size=self.batch_size,
            accelerator=self._torch_device.type,
            devices=1,
            precision=resolve_precision(self.precision, self._torch_device),
            seed=self.random_state,
            progress=self.progress,
            **settings,
        )
        if strategy == "head":
            model.feature_norm.fit(torch.as_tensor(self._features[self._labels("train")[0]]))
            datasets = {
                name: FeatureDataset(self._features[cells], labels)
                for name in ("train", "val", "test")
                for cells, labels in [self._labels(name)]
            }
        else:
            datasets = {name: getattr(self.split_, name) for name in ("train", "val", "test")}
        trainer.fit(datasets["train"], datasets["val"] if len(datasets["val"]) else None)
        model = model.to("cpu").eval()
        metrics, test_proba = self._evaluate(
            lambda split, _: trainer.predict(datasets[split])["probabilities"]
        )
        return StrategyResult(
            extra={"test_probabilities": test_proba},
            strategy=strategy,
            metrics=metrics,
            trainable_parameters=model.trainable_parameter_count(),
            runtime_sec=0.0,
            history=trainer.history_,
            config=None if model.strategy_config is None else model.strategy_config.to_dict(),
            training=settings,
            model=model,
        )

    def _batch_metrics(self, results: dict[str, StrategyResult]) -> pd.DataFrame:
        """Accuracy and macro-F1 (over the classes present) per test batch and strategy."""
        from sklearn.metrics import accuracy_score, f1_score

        cells, labels = self._labels("test")
        batch_of = self.prepared_.batches[cells]
        rows = []
        for name, result in results.items():
            proba = result.extra.get("test_probabilities")
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

    def _metrics_row(self, result: StrategyResult) -> dict[str, Any]:
        row: dict[str, Any] = {"strategy": result.strategy}
        for prefix in ("validation", "test"):
            for m in METRIC_NAMES:
                value = result.metrics.get(f"{prefix}_{m}")
                row[f"{prefix}_{m}"] = np.nan if value is None else float(value)
        row["trainable_parameters"] = int(result.trainable_parameters)
        row["runtime_sec"] = float(result.runtime_sec)
        return row

    # ----------------------------------------------------------------------------- predict

    def _predict_with(
        self,
        encode: Any,
        adata: Any,
        *,
        gene_key: str | None,
        layer: str | None,
        features: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Probabilities and latent of the best strategy.

        ``encode(forward, desc)`` runs a batch function over every cell (tokens already in
        memory, or streamed from ``adata``); ``features`` are precomputed ``<cls>`` outputs.
        """
        best = self._best
        n_classes = len(self.label_categories_)
        if best.strategy == "baseline":
            from scdlkit._shared.validation import gene_names
            from scdlkit.baselines._expression import log_normalised_matrix

            matrix = log_normalised_matrix(adata, layer)
            genes = gene_names(adata, gene_key)
            probabilities = _full_proba(
                best.model.predict_proba(matrix, genes), best.model, n_classes
            )
            latent = best.model.latent(matrix, genes)
        elif best.strategy in FEATURE_STRATEGIES:
            if features is None:
                encoder = self._base_encoder
                features = encode(
                    lambda b: encoder.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
                    "<cls> features",
                )
            if best.strategy == "frozen_probe":
                probabilities = _probe_proba(best.model, features, n_classes)
            else:
                with torch.inference_mode():
                    logits = best.model({"features": torch.as_tensor(features)})["logits"].numpy()
                probabilities = softmax(logits)
            latent = features
        else:
            model = best.model.to(self._torch_device).eval()

            def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                out = model(batch)
                return torch.cat([out["logits"].float(), out["latent"].float()], dim=1)

            joined = encode(forward, "predicting")
            model.to("cpu")
            probabilities = softmax(joined[:, :n_classes])
            latent = joined[:, n_classes:]
        return self._finish(probabilities, latent)

    def _predict_prepared(self, prepared: ScGPTPreparedData, adata: Any) -> dict[str, np.ndarray]:
        """Predictions for the reference cells, reusing their tokens and frozen features."""

        def encode(forward: Any, desc: str) -> np.ndarray:
            return encode_cells(
                prepared.tokens,
                forward,
                device=self._torch_device,
                batch_size=self.batch_size,
                precision=self.precision,
                progress=self.progress,
                desc=desc,
            )

        return self._predict_with(
            encode, adata, gene_key=self.gene_key, layer=self.layer, features=self._features
        )

    def _finish(self, probabilities: np.ndarray, latent: np.ndarray) -> dict[str, np.ndarray]:
        codes = probabilities.argmax(axis=1).astype(np.int64)
        confidence = probabilities.max(axis=1)
        categories = np.asarray(self.label_categories_, dtype=object)
        labels = categories[codes]
        if self.confidence_threshold is not None:
            unsure = confidence < self.confidence_threshold
            codes[unsure] = -1
            labels = labels.copy()
            labels[unsure] = UNKNOWN_LABEL
        return {
            "label_codes": codes,
            "labels": labels,
            "probabilities": probabilities.astype(np.float32),
            "latent": np.asarray(latent, dtype=np.float32),
        }

    def predict(
        self,
        adata: Any,
        *,
        gene_key: str | None = None,
        layer: str | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Label cells with the best strategy.

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

        Returns
        -------
        dict
            ``label_codes`` (int, -1 for ``"Unknown"``), ``labels`` (str), ``probabilities``
            ``(n_cells, n_classes)``, ``latent`` (the best model's cell representation).
        """
        self._require_fitted("predict")
        from scdlkit.foundation._stream import encode_adata

        gene_key = self.gene_key if gene_key is None else gene_key
        layer = self.layer if layer is None else layer

        def encode(forward: Any, desc: str) -> np.ndarray:
            return encode_adata(
                adata,
                self.checkpoint_,
                forward,
                device=self._torch_device,
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

        return self._predict_with(encode, adata, gene_key=gene_key, layer=layer)

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
        self._require_fitted("annotate_adata")
        predictions = self.predict(adata) if predictions is None else predictions
        categories = list(self.label_categories_)
        if self.confidence_threshold is not None:
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
        from scdlkit.foundation._runner_io import save_runner

        self._require_fitted("save")
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
        from scdlkit.foundation._runner_io import load_runner

        return load_runner(
            cls, Path(path), checkpoint=checkpoint, device=device, verify=verify_checkpoint
        )

    def __repr__(self) -> str:
        state = f"best={self.best_strategy_!r}" if self._fitted else "not fitted"
        return f"ScGPTAnnotationRunner(strategies={list(self.strategies)}, {state})"


def _probe_proba(model: dict[str, Any], features: np.ndarray, n_classes: int) -> np.ndarray:
    probe = model["probe"]
    return _full_proba(probe.predict_proba(model["scaler"].transform(features)), probe, n_classes)


def _full_proba(proba: np.ndarray, model: Any, n_classes: int) -> np.ndarray:
    """Columns for every class, also those absent from the training split (probability 0)."""
    classes = getattr(model, "classes_", None)
    if classes is None:
        classes = model.classifier_.classes_
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float32)
    out[:, np.asarray(classes)] = proba
    return out


def adapt_scgpt_annotation(
    adata: Any,
    *,
    label_key: str,
    checkpoint: str | os.PathLike | ScGPTCheckpoint = "whole-human",
    strategies: Sequence[str] = ("frozen_probe", "head"),
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
        ``confidence_threshold``, ``progress``).

    Returns
    -------
    ScGPTAnnotationRunner
        The fitted :class:`ScGPTAnnotationRunner`.

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
    """A fresh temporary folder for a runner saved without ``output_dir``."""
    return Path(tempfile.mkdtemp(prefix="scdlkit-runner-"))
