"""TaskRunner: plain deep-learning baselines (MLP, autoencoder, VAE) on expression.

Lifecycle: :meth:`TaskRunner.fit` validates the AnnData, log-normalises it
(:func:`~scdlkit.baselines.log_normalised_matrix`), splits the cells once (stratified by label),
standardises every gene with statistics of the training split, trains the model with the shared
:class:`~scdlkit.training.Trainer` and scores the validation and test splits.
:meth:`~TaskRunner.predict` and :meth:`~TaskRunner.encode` apply it to any AnnData (genes
aligned by name); :meth:`~TaskRunner.save` and :meth:`~TaskRunner.load` persist it as a strict
JSON manifest plus weights (no pickle), written atomically. The features are built in
:mod:`scdlkit.baselines._features`, the folder format is :mod:`scdlkit.baselines._task_runner_io`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from scdlkit._shared.arguments import check_bool, check_choice, check_int, check_number
from scdlkit._shared.hardware import resolve_device
from scdlkit._shared.labels import encode_labels, read_label_column
from scdlkit._shared.numeric import softmax
from scdlkit._shared.persist import MANIFEST_NAME
from scdlkit._shared.progress import tqdm
from scdlkit._shared.provenance import package_versions
from scdlkit._shared.splits import MIN_CELLS_TO_STRATIFY, SPLIT_NAMES, stratified_split
from scdlkit.baselines._features import (
    ExpressionDataset,
    align_genes,
    gene_statistics,
    read_expression,
)
from scdlkit.baselines._metrics import knn_label_consistency, silhouette
from scdlkit.baselines._models import TASKS, VALID_COMBINATIONS, build_model, resolve_task
from scdlkit.baselines._task_runner_io import (
    KIND,
    SCHEMA_VERSION,
    history_frame,
    read_runner_folder,
    restore_features,
    restore_model,
    runner_kwargs,
    write_runner_folder,
)
from scdlkit.training import Trainer
from scdlkit.training._checks import (
    FRACTION,
    SEED,
    TRAINING_SETTINGS,
    Check,
    check_adata,
    check_arguments,
    check_device,
    check_optional_path,
    check_optional_text,
    check_path,
)
from scdlkit.training.metrics import classification_metrics

__all__ = ["TASKS", "VALID_COMBINATIONS", "TaskRunner", "stratified_split"]

logger = logging.getLogger("scdlkit")

CLASSIFICATION_METRICS = (
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "weighted_f1",
    "auroc_ovr",
    "n_cells",
)
REPRESENTATION_METRICS = ("knn_label_consistency", "silhouette", "reconstruction_loss", "n_cells")


def check_widths(name: str, value: Any) -> tuple[int, ...]:
    """Layer widths: a sequence of integers >= 1 such as ``(256, 128)``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        msg = f"{name} must be a sequence of layer widths such as (256, 128), got {value!r}."
        raise TypeError(msg)
    return tuple(check_int(f"{name}[{i}]", w, min_value=1) for i, w in enumerate(value))


#: Every argument of :class:`TaskRunner`, checked in the constructor before any work.
TASK_RUNNER_ARGUMENTS: dict[str, Check] = {
    "model": partial(check_choice, choices=tuple(VALID_COMBINATIONS)),
    "task": partial(check_choice, choices=(None, *TASKS)),
    "latent_dim": partial(check_int, min_value=1),
    "hidden_dims": check_widths,
    "epochs": TRAINING_SETTINGS["epochs"],
    "batch_size": partial(check_int, min_value=1),
    "lr": TRAINING_SETTINGS["lr"],
    "weight_decay": TRAINING_SETTINGS["weight_decay"],
    "dropout": FRACTION,
    "kl_weight": partial(check_number, min_value=0),
    "class_weight": partial(check_choice, choices=("auto", None, "balanced")),
    "device": check_device,
    "precision": partial(check_choice, choices=("auto", "fp32", "bf16")),
    "label_key": check_optional_text,
    "layer": check_optional_text,
    "gene_key": check_optional_text,
    "val_size": FRACTION,
    "test_size": FRACTION,
    "random_state": SEED,
    "output_dir": check_optional_path,
    "early_stopping_patience": TRAINING_SETTINGS["early_stopping_patience"],
    "n_neighbors": partial(check_int, min_value=1),
    "progress": check_bool,
}
#: The arguments of the methods that read an AnnData.
QUERY_ARGUMENTS: dict[str, Check] = {
    "adata": check_adata,
    "layer": check_optional_text,
    "gene_key": check_optional_text,
}


class TaskRunner:
    """Train a plain deep-learning baseline on an AnnData's expression and apply it.

    Models: ``"mlp"`` (classifier, ``task="classification"``), ``"autoencoder"`` and ``"vae"``
    (cell representations, ``task="representation"``). Input features are log-normalised
    expression (raw counts get ``normalize_total(1e4)`` + ``log1p``; log-normalised values are
    used as they are), standardised per gene with the mean and standard deviation of the
    training split and clipped to ``[-10, 10]``. At prediction time genes are matched by name;
    genes the query lacks are set to 0 after standardising (the training mean).

    Splits: labelled cells are split per class into train/validation/test (a class with fewer
    than 3 cells goes to train only, with a warning). For classification, unlabelled cells
    (missing label) are left out of training and evaluation and still get predictions. For
    representation every cell is trained on (unlabelled cells are split as one more group);
    label-based metrics use the labelled cells only.

    Parameters
    ----------
    model
        ``"mlp"``, ``"autoencoder"`` or ``"vae"``.
    task
        ``"classification"`` or ``"representation"``; ``None`` infers it from ``model``
        (``mlp`` -> classification, otherwise representation). Other pairs are an error.
    latent_dim
        Width of the latent representation (the MLP's bottleneck, the (V)AE's code).
    hidden_dims
        Widths of the hidden layers (the decoders mirror them).
    epochs
        Maximum number of training epochs.
    batch_size
        Cells per batch for training and inference.
    lr
        Learning rate of AdamW.
    weight_decay
        AdamW weight decay.
    dropout
        Dropout after every hidden activation.
    kl_weight
        Weight of the VAE's KL term (``model="vae"`` only).
    class_weight
        ``"balanced"`` weights the cross-entropy by inverse class frequency in the training
        split (see :class:`scdlkit.Trainer`), which favours macro-F1 on imbalanced cell types;
        ``None`` weights every cell alike. ``"auto"`` (default) is ``"balanced"`` for
        classification and ``None`` for representation (where only ``None`` is allowed).
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or a torch device string.
    precision
        Training precision: ``"auto"`` (bf16 mixed on a capable CUDA GPU, else fp32),
        ``"fp32"`` or ``"bf16"``. Inference always runs in fp32.
    label_key
        ``adata.obs`` column with cell types; required for classification, optional for
        representation (then used for the kNN and silhouette metrics and stratification).
    layer
        ``adata.layers`` key holding the values; ``None`` uses ``adata.X``.
    gene_key
        ``adata.var`` column with gene names; ``None`` uses ``var_names``.
    val_size, test_size
        Fractions of cells held out for early stopping and for the reported metrics.
    random_state
        Seeds the split, the model's initialisation and training; same value, same result.
    output_dir
        If given, :meth:`fit` saves the fitted runner there.
    early_stopping_patience
        Stop after this many epochs without a lower validation loss (``None``: never).
    n_neighbors
        ``k`` of the kNN label consistency metric.
    progress
        Show progress bars.

    Attributes
    ----------
    model_
        The trained :class:`torch.nn.Module`.
    genes_
        Gene names the model reads, in order.
    label_categories_
        Class names in code order (empty for representation without ``label_key``).
    metrics_
        ``{"validation": {...}, "test": {...}}``; :meth:`evaluate` returns the test part.
    history_
        Per-epoch :class:`pandas.DataFrame` of the Trainer.
    split_labels_
        ``"train"``/``"val"``/``"test"``/``"unlabelled"`` for every cell ``fit`` saw.
    split_summary_
        Sizes of the splits and the seed.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scdlkit as sck
    >>> adata = sc.datasets.pbmc68k_reduced().raw.to_adata()  # doctest: +SKIP
    >>> runner = sck.TaskRunner(model="mlp", label_key="bulk_labels").fit(adata)  # doctest: +SKIP
    >>> runner.evaluate()["macro_f1"]  # doctest: +SKIP
    >>> vae = sck.TaskRunner(model="vae", label_key="bulk_labels").fit(adata)  # doctest: +SKIP
    >>> adata.obsm["X_vae"] = vae.encode(adata)  # doctest: +SKIP
    >>> vae.save("runs/vae")  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        model: str = "mlp",
        task: str | None = None,
        latent_dim: int = 32,
        hidden_dims: Sequence[int] = (256, 128),
        epochs: int = 50,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        dropout: float = 0.2,
        kl_weight: float = 1.0,
        class_weight: str | None = "auto",
        device: str = "auto",
        precision: str = "auto",
        label_key: str | None = None,
        layer: str | None = None,
        gene_key: str | None = None,
        val_size: float = 0.15,
        test_size: float = 0.15,
        random_state: int = 42,
        output_dir: str | os.PathLike | None = None,
        early_stopping_patience: int | None = 10,
        n_neighbors: int = 15,
        progress: bool = True,
    ) -> None:
        arguments = check_arguments(
            TASK_RUNNER_ARGUMENTS, {k: v for k, v in locals().items() if k != "self"}
        )
        self.task = resolve_task(model, task)
        self.model = model
        val_size, test_size = arguments["val_size"], arguments["test_size"]
        if val_size + test_size >= 1:
            msg = f"val_size + test_size = {val_size + test_size} leaves no cells for training."
            raise ValueError(msg)
        if class_weight == "auto":
            class_weight = "balanced" if self.task == "classification" else None
        if class_weight is not None and self.task != "classification":
            msg = "`class_weight` applies to task='classification' only; leave it as None."
            raise ValueError(msg)
        if self.task == "classification" and label_key is None:
            msg = (
                "task='classification' needs label_key= naming the adata.obs column with the "
                "cell types."
            )
            raise ValueError(msg)
        self.latent_dim = arguments["latent_dim"]
        self.hidden_dims = arguments["hidden_dims"]
        self.epochs = arguments["epochs"]
        self.batch_size = arguments["batch_size"]
        self.lr = arguments["lr"]
        self.weight_decay = arguments["weight_decay"]
        self.dropout = arguments["dropout"]
        self.kl_weight = arguments["kl_weight"]
        self.class_weight = class_weight
        self.device = device
        self.precision = precision
        self.label_key = label_key
        self.layer = layer
        self.gene_key = gene_key
        self.val_size = val_size
        self.test_size = test_size
        self.random_state = arguments["random_state"]
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.early_stopping_patience = arguments["early_stopping_patience"]
        self.n_neighbors = arguments["n_neighbors"]
        self.progress = arguments["progress"]
        self.runner_dir_: Path | None = None
        self._fitted = False

    # ------------------------------------------------------------------------------ helpers

    @property
    def _torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def _require_fitted(self, what: str) -> None:
        if not self._fitted:
            msg = f"{what} needs a fitted runner: call fit(adata) first (or TaskRunner.load)."
            raise RuntimeError(msg)

    def params(self) -> dict[str, Any]:
        """Every argument that shapes the result, as plain JSON-ready values."""
        return {
            "model": self.model,
            "task": self.task,
            "latent_dim": self.latent_dim,
            "hidden_dims": list(self.hidden_dims),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "dropout": self.dropout,
            "kl_weight": self.kl_weight,
            "class_weight": self.class_weight,
            "device": str(self.device),
            "precision": self.precision,
            "label_key": self.label_key,
            "layer": self.layer,
            "gene_key": self.gene_key,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "random_state": self.random_state,
            "early_stopping_patience": self.early_stopping_patience,
            "n_neighbors": self.n_neighbors,
        }

    def _read_labels(self, adata: Any) -> tuple[np.ndarray, list[str]]:
        if self.label_key is None:
            return np.full(adata.n_obs, -1, dtype=np.int64), []
        encoded = encode_labels(read_label_column(adata.obs, self.label_key), min_classes=2)
        return encoded.codes, encoded.categories

    def _dataset(
        self, matrix: sparse.csr_matrix, labels: np.ndarray, missing: np.ndarray | None = None
    ) -> ExpressionDataset:
        return ExpressionDataset(matrix, self.mean_, self.scale_, labels, missing)

    # ---------------------------------------------------------------------------- lifecycle

    def fit(self, adata: Any) -> TaskRunner:
        """Split, standardise, train and score (see the class docstring).

        Parameters
        ----------
        adata
            Cells x genes, raw counts or log-normalised, with ``obs[label_key]`` when needed.
            Not modified.

        Returns
        -------
        TaskRunner
            ``self``, fitted.

        Examples
        --------
        >>> runner = sck.TaskRunner(model="mlp", label_key="cell_type").fit(adata)  # doctest: +SKIP
        """
        check_adata("adata", adata)
        codes, categories = self._read_labels(adata)
        matrix, genes = read_expression(adata, self.layer, self.gene_key)
        if self.task == "classification":
            cells = np.flatnonzero(codes >= 0)
        else:
            cells = np.arange(adata.n_obs)
        splits, small = stratified_split(
            cells,
            codes[cells],
            val_size=self.val_size,
            test_size=self.test_size,
            random_state=self.random_state,
        )
        small_classes = [categories[c] for c in small if c >= 0]
        if small_classes:
            logger.warning(
                "classes with fewer than %d labelled cells go to the training split only, so "
                "they are not evaluated: %s",
                MIN_CELLS_TO_STRATIFY,
                ", ".join(small_classes),
            )
        split_labels = np.full(adata.n_obs, "unlabelled", dtype=object)
        for name in SPLIT_NAMES:
            split_labels[splits[name]] = name

        self._fitted = False  # a refit that fails half-way must not look fitted
        self.genes_ = [str(g) for g in genes]
        self.label_categories_ = list(categories)
        self.mean_, self.scale_ = gene_statistics(matrix[splits["train"]])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            model = build_model(self.model, self._model_config())
        device = self._torch_device
        trainer = Trainer(
            model,
            task=self.task,
            batch_size=self.batch_size,
            epochs=self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            early_stopping_patience=self.early_stopping_patience,
            class_weight=self.class_weight,
            precision=self.precision,
            accelerator=device.type,
            devices=[device.index] if device.index is not None else 1,
            seed=self.random_state,
            progress=self.progress,
        )
        data = {name: self._dataset(matrix[splits[name]], codes[splits[name]]) for name in splits}
        trainer.fit(data["train"], data["val"] if len(splits["val"]) else None)

        self.model_ = model.eval()
        self.history_ = trainer.history_
        self.best_epoch_ = trainer.best_epoch_
        self.trainable_parameters_ = trainer.trainable_parameters_
        self.split_labels_ = split_labels
        self.split_summary_ = {
            "random_state": self.random_state,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "n_train": len(splits["train"]),
            "n_val": len(splits["val"]),
            "n_test": len(splits["test"]),
            "n_unlabelled": int((split_labels == "unlabelled").sum()),
            "small_classes": small_classes,
        }
        self._fitted = True
        outputs = self._forward(self._dataset(matrix, codes), reconstruction=False)
        self.metrics_ = {
            "validation": self._score(outputs, codes, splits["val"]),
            "test": self._score(outputs, codes, splits["test"]),
        }
        self._reference = self._finish(outputs, reconstruction=False)
        logger.info("TaskRunner(%s): test metrics %s", self.model, self.metrics_["test"])
        if self.output_dir is not None:
            self.save(self.output_dir)
        return self

    def _model_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "n_features": len(self.genes_),
            "hidden_dims": list(self.hidden_dims),
            "latent_dim": self.latent_dim,
            "dropout": self.dropout,
        }
        if self.model == "mlp":
            config["n_classes"] = len(self.label_categories_)
        if self.model == "vae":
            config["kl_weight"] = self.kl_weight
        return config

    def _forward(
        self, dataset: ExpressionDataset, *, reconstruction: bool
    ) -> dict[str, np.ndarray]:
        """fp32 outputs for every cell of ``dataset``, in order."""
        device = self._torch_device
        model = self.model_.to(device).eval()
        parts: dict[str, list[np.ndarray]] = defaultdict(list)
        starts = range(0, len(dataset), self.batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="Predicting", unit="batch", disable=not self.progress):
                x = dataset.collate_fn(range(start, min(start + self.batch_size, len(dataset))))
                x = x["x"].to(device)
                out = model({"x": x})
                parts["latent"].append(out["latent"].float().cpu().numpy())
                if "logits" in out:
                    parts["logits"].append(out["logits"].float().cpu().numpy())
                if "reconstruction" in out:
                    rec = out["reconstruction"].float()
                    parts["squared_error"].append(((rec - x) ** 2).mean(dim=1).cpu().numpy())
                    if reconstruction:
                        parts["reconstruction"].append(rec.cpu().numpy())
        return {key: np.concatenate(value) for key, value in parts.items()}

    def _score(self, outputs: dict[str, np.ndarray], codes: np.ndarray, cells: np.ndarray) -> dict:
        """Metrics of one split (``None`` where undefined)."""
        if self.task == "classification":
            probabilities = softmax(outputs["logits"][cells])
            metrics = classification_metrics(
                codes[cells], probabilities, n_classes=len(self.label_categories_)
            )
            return {name: metrics[name] for name in CLASSIFICATION_METRICS}
        latent, labels = outputs["latent"][cells], codes[cells]
        error = outputs["squared_error"][cells]
        return {
            "knn_label_consistency": knn_label_consistency(latent, labels, k=self.n_neighbors),
            "silhouette": silhouette(latent, labels),
            "reconstruction_loss": float(error.mean()) if len(cells) else None,
            "n_cells": len(cells),
        }

    def _finish(self, outputs: dict[str, np.ndarray], *, reconstruction: bool) -> dict:
        out: dict[str, np.ndarray] = {}
        if self.task == "classification":
            probabilities = softmax(outputs["logits"])
            codes = probabilities.argmax(axis=1).astype(np.int64)
            out["label_codes"] = codes
            out["labels"] = np.asarray(self.label_categories_, dtype=object)[codes]
            out["probabilities"] = probabilities
        out["latent"] = outputs["latent"].astype(np.float32)
        if reconstruction and "reconstruction" in outputs:
            out["reconstruction"] = outputs["reconstruction"].astype(np.float32)
        return out

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the fitted model on the held-out test split.

        Returns
        -------
        dict
            Classification: ``accuracy``, ``macro_f1``, ``balanced_accuracy``,
            ``weighted_f1``, ``auroc_ovr`` (see
            :func:`~scdlkit.training.classification_metrics`) and ``n_cells``.
            Representation: ``knn_label_consistency`` (mean fraction of each labelled test
            cell's ``n_neighbors`` nearest test cells in latent space that share its label),
            ``silhouette`` (of the latent, grouped by label), ``reconstruction_loss`` (mean
            squared error per standardised value) and ``n_cells``. Undefined values (no labels,
            empty split) are ``None``. Validation metrics are in ``metrics_["validation"]``.

        Examples
        --------
        >>> runner.evaluate()["macro_f1"]  # doctest: +SKIP
        0.71
        """
        self._require_fitted("evaluate")
        return dict(self.metrics_["test"])

    def reference_predictions(self) -> dict[str, np.ndarray]:
        """:meth:`predict`'s output for the cells ``fit`` saw (without ``reconstruction``).

        Computed once during :meth:`fit`; not available after :meth:`load`.
        """
        self._require_fitted("reference_predictions")
        if getattr(self, "_reference", None) is None:
            msg = "a loaded runner has no reference predictions; call predict(adata)."
            raise RuntimeError(msg)
        return {key: value.copy() for key, value in self._reference.items()}

    def _query_dataset(
        self, adata: Any, layer: str | None, gene_key: str | None
    ) -> ExpressionDataset:
        matrix, genes = read_expression(adata, layer, gene_key)
        aligned, missing = align_genes(matrix, genes, self.genes_)
        return self._dataset(aligned, np.full(adata.n_obs, -1, dtype=np.int64), missing)

    def predict(
        self, adata: Any, *, layer: str | None = None, gene_key: str | None = None
    ) -> dict[str, np.ndarray]:
        """Apply the model to any AnnData; genes are matched to the training genes by name.

        Parameters
        ----------
        adata
            Cells x genes (raw counts or log-normalised). Not modified. Genes the model was not
            trained on are ignored; training genes absent here are set to the training mean.
        layer, gene_key
            Where the values and gene names are (default: as in :meth:`fit`).

        Returns
        -------
        dict
            Classification: ``label_codes`` (int64), ``labels`` (class names, object array),
            ``probabilities`` ``(n_cells, n_classes)`` and ``latent`` ``(n_cells,
            latent_dim)``. Representation: ``latent`` and ``reconstruction`` (the model's
            reconstruction of the standardised features, ``(n_cells, n_genes)``). All float
            arrays are float32.

        Examples
        --------
        >>> out = runner.predict(query)  # doctest: +SKIP
        >>> query.obs["mlp_label"] = out["labels"]  # doctest: +SKIP
        """
        self._require_fitted("predict")
        check_arguments(QUERY_ARGUMENTS, {"adata": adata, "layer": layer, "gene_key": gene_key})
        layer = self.layer if layer is None else layer
        gene_key = self.gene_key if gene_key is None else gene_key
        dataset = self._query_dataset(adata, layer, gene_key)
        return self._finish(self._forward(dataset, reconstruction=True), reconstruction=True)

    def encode(
        self, adata: Any, *, layer: str | None = None, gene_key: str | None = None
    ) -> np.ndarray:
        """The latent representation of every cell of ``adata``.

        Parameters
        ----------
        adata
            Cells x genes; see :meth:`predict`. Not modified.
        layer, gene_key
            Where the values and gene names are (default: as in :meth:`fit`).

        Returns
        -------
        numpy.ndarray
            float32, ``(n_cells, latent_dim)``.

        Examples
        --------
        >>> adata.obsm["X_vae"] = runner.encode(adata)  # doctest: +SKIP
        """
        self._require_fitted("encode")
        check_arguments(QUERY_ARGUMENTS, {"adata": adata, "layer": layer, "gene_key": gene_key})
        layer = self.layer if layer is None else layer
        gene_key = self.gene_key if gene_key is None else gene_key
        dataset = self._query_dataset(adata, layer, gene_key)
        return self._forward(dataset, reconstruction=False)["latent"].astype(np.float32)

    # -------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Save atomically to the folder ``path``: ``manifest.json`` plus the weights.

        The weights (model state and the per-gene standardisation) are a safetensors file when
        the ``safetensors`` package is installed, else a torch file of plain tensors (read back
        with ``torch.load(weights_only=True)``). They are written under a new content-addressed
        name first, then the manifest that names them (with their sha256) replaces the old one
        in one rename, then stale weights are removed; an interrupted save leaves the previous
        one intact. Nothing is pickled.

        Parameters
        ----------
        path
            Folder, created if needed.

        Returns
        -------
        pathlib.Path
            The folder.

        Examples
        --------
        >>> runner.save("runs/mlp")  # doctest: +SKIP
        >>> same = sck.TaskRunner.load("runs/mlp")  # doctest: +SKIP
        """
        self._require_fitted("save")
        check_path("path", path)
        path = Path(path)
        tensors = {
            f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
            for k, v in self.model_.state_dict().items()
        }
        tensors["features.mean"] = torch.from_numpy(np.ascontiguousarray(self.mean_))
        tensors["features.scale"] = torch.from_numpy(np.ascontiguousarray(self.scale_))
        history = self.history_ if self.history_ is not None else pd.DataFrame()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "versions": package_versions(),
            "model": self.model,
            "task": self.task,
            "params": self.params(),
            "model_config": self._model_config(),
            "genes": list(self.genes_),
            "label_categories": list(self.label_categories_),
            "metrics": self.metrics_,
            "history": history.to_dict(orient="records"),
            "best_epoch": self.best_epoch_,
            "trainable_parameters": self.trainable_parameters_,
            "split": self.split_summary_,
        }
        write_runner_folder(path, tensors, manifest)
        self.runner_dir_ = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto") -> TaskRunner:
        """Rebuild a runner saved by :meth:`save`; it predicts exactly what the saved one did.

        The manifest is validated (schema version, fields, model/task pair) and the weights
        file must match the sha256 recorded in it; its tensors must match the model exactly.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        device
            Where to run predictions.

        Returns
        -------
        TaskRunner
            Fitted (``metrics_``, ``history_``, ``genes_``, ``label_categories_`` restored).

        Examples
        --------
        >>> runner = sck.TaskRunner.load("runs/mlp", device="cpu")  # doctest: +SKIP
        >>> runner.predict(query)["labels"]  # doctest: +SKIP
        """
        check_path("path", path)
        check_device("device", device)
        path = Path(path)
        manifest, tensors = read_runner_folder(path)
        file = path / MANIFEST_NAME
        try:
            runner = cls(**runner_kwargs(manifest), device=device, progress=False)
        except (TypeError, ValueError) as err:
            msg = f"{file}: the recorded params are invalid ({err})."
            raise ValueError(msg) from err
        if (runner.model, runner.task) != (manifest["model"], manifest["task"]):
            msg = f"{file}: params disagree with the recorded model and task."
            raise ValueError(msg)
        runner.genes_ = list(manifest["genes"])
        runner.label_categories_ = list(manifest["label_categories"])
        config = runner._model_config()
        if manifest["model_config"] != config:
            msg = f"{file}: model_config does not match the recorded params, genes and labels."
            raise ValueError(msg)
        runner.mean_, runner.scale_ = restore_features(tensors, len(runner.genes_), file)
        runner.model_ = restore_model(runner.model, config, tensors, file)
        runner.metrics_ = {
            split: dict(manifest["metrics"].get(split) or {}) for split in ("validation", "test")
        }
        runner.history_ = history_frame(manifest.get("history") or [])
        runner.best_epoch_ = manifest.get("best_epoch")
        runner.trainable_parameters_ = manifest.get("trainable_parameters")
        runner.split_summary_ = dict(manifest.get("split") or {})
        runner._reference = None
        runner._fitted = True
        runner.runner_dir_ = path
        return runner

    def __repr__(self) -> str:
        state = "fitted" if self._fitted else "not fitted"
        return f"TaskRunner(model={self.model!r}, task={self.task!r}, {state})"
