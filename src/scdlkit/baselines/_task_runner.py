"""TaskRunner: plain deep-learning baselines (MLP, autoencoder, VAE) on expression.

Lifecycle: :meth:`TaskRunner.fit` validates the AnnData, log-normalises it
(:func:`~scdlkit.baselines.log_normalised_matrix`), splits the cells once (stratified by label),
standardises every gene with statistics of the training split, trains the model with the shared
:class:`~scdlkit.training.Trainer` and scores the validation and test splits.
:meth:`~TaskRunner.predict` and :meth:`~TaskRunner.encode` apply it to any AnnData (genes
aligned by name); :meth:`~TaskRunner.save` and :meth:`~TaskRunner.load` persist it as a strict
JSON manifest plus safetensors weights (no pickle), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch.utils.data import Dataset

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    read_checked_weights,
    read_manifest_file,
    sha256_file,
)
from scdlkit.baselines._metrics import knn_label_consistency, silhouette
from scdlkit.baselines._models import build_model
from scdlkit.foundation._data import allocate_split_counts
from scdlkit.training._checks import check_int, check_number

__all__ = ["TASKS", "VALID_COMBINATIONS", "TaskRunner", "stratified_split"]

logger = logging.getLogger("scdlkit")

SCHEMA_VERSION = 1
KIND = "scdlkit.TaskRunner"
TASKS = ("classification", "representation")
#: The task each model solves; other pairs are rejected.
VALID_COMBINATIONS = {
    "mlp": "classification",
    "autoencoder": "representation",
    "vae": "representation",
}
#: Standardised values are clipped to +-MAX_VALUE (as ``sc.pp.scale(max_value=10)``).
MAX_VALUE = 10.0
#: A class needs this many cells to appear in train, validation and test.
MIN_CELLS_TO_STRATIFY = 3
SPLIT_NAMES = ("train", "val", "test")
CLASSIFICATION_METRICS = (
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "weighted_f1",
    "auroc_ovr",
    "n_cells",
)
REPRESENTATION_METRICS = ("knn_label_consistency", "silhouette", "reconstruction_loss", "n_cells")
_VALID_TEXT = (
    "model='mlp' with task='classification', or model='autoencoder'/'vae' with "
    "task='representation'"
)
_REQUIRED = {
    "schema_version": int,
    "kind": str,
    "model": str,
    "task": str,
    "params": dict,
    "model_config": dict,
    "genes": list,
    "label_categories": list,
    "metrics": dict,
    "weights_file": str,
    "weights_sha256": str,
}


# ---------------------------------------------------------------------------------- helpers


def resolve_task(model: Any, task: Any) -> str:
    """The task of ``model`` (``task=None`` infers it); a ValueError names the valid pairs."""
    if model not in VALID_COMBINATIONS:
        msg = f"model={model!r} is not a baseline; choose 'mlp', 'autoencoder' or 'vae'."
        raise ValueError(msg)
    if task is None:
        return VALID_COMBINATIONS[model]
    if task not in TASKS:
        msg = f"task={task!r}; choose 'classification' or 'representation' (or None to infer)."
        raise ValueError(msg)
    if VALID_COMBINATIONS[model] != task:
        msg = f"model={model!r} cannot do task={task!r}; valid combinations: {_VALID_TEXT}."
        raise ValueError(msg)
    return task


def stratified_split(
    cells: np.ndarray,
    strata: np.ndarray,
    *,
    val_size: float,
    test_size: float,
    random_state: int,
    min_cells: int = MIN_CELLS_TO_STRATIFY,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Split ``cells`` into train/val/test, each stratum (e.g. class code) in proportion.

    Parameters
    ----------
    cells
        Cell indices to split.
    strata
        Group of each entry of ``cells`` (same length); each group is split separately.
    val_size, test_size
        Fractions of each group for validation and test (at least one cell each where the group
        has ``min_cells`` or more; at least one cell always stays in training).
    random_state
        Seed of the permutation; same inputs, same split.
    min_cells
        Smaller groups go wholly to ``train``.

    Returns
    -------
    tuple
        ``{"train", "val", "test"}`` -> sorted index arrays, and the strata that were too small.

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.baselines import stratified_split
    >>> parts, small = stratified_split(
    ...     np.arange(20), np.repeat([0, 1], 10), val_size=0.2, test_size=0.2, random_state=0
    ... )
    >>> [len(parts[s]) for s in ("train", "val", "test")], small
    ([12, 4, 4], [])
    """
    cells = np.asarray(cells, dtype=np.int64)
    strata = np.asarray(strata)
    rng = np.random.default_rng(random_state)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    small: list[int] = []
    for stratum in np.unique(strata):
        group = rng.permutation(cells[strata == stratum])
        if len(group) < min_cells and (val_size or test_size):
            small.append(stratum.item())
            parts["train"].append(group)
            continue
        n_val, n_test = allocate_split_counts(len(group), val_size, test_size)
        parts["test"].append(group[:n_test])
        parts["val"].append(group[n_test : n_test + n_val])
        parts["train"].append(group[n_test + n_val :])
    empty = np.zeros(0, np.int64)
    out = {name: np.sort(np.concatenate(p)) if p else empty for name, p in parts.items()}
    return out, small


def _unique_genes(genes: pd.Index, where: str) -> None:
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:5].tolist()
        msg = (
            f"{where} has duplicate gene names ({', '.join(map(str, dup))}, ...); genes are "
            "matched by name, so make them unique first: adata.var_names_make_unique()."
        )
        raise ValueError(msg)


class _ExpressionDataset(Dataset):
    """Cells of a log-normalised CSR matrix, standardised batch by batch (never all at once).

    ``dataset[i]`` is ``i``; :meth:`collate_fn` builds ``{"x", "labels"}`` for a list of cells.
    Columns where ``missing`` is true (genes absent from the query) are 0 after standardising.
    """

    def __init__(
        self,
        matrix: sparse.csr_matrix,
        mean: np.ndarray,
        scale: np.ndarray,
        labels: np.ndarray,
        missing: np.ndarray | None = None,
    ) -> None:
        self.matrix = matrix
        self.mean = mean.astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.labels = labels.astype(np.int64)
        self.missing = missing if missing is not None and missing.any() else None

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, i: int) -> int:
        return int(i)

    def features(self, positions: Sequence[int]) -> np.ndarray:
        rows = self.matrix[np.asarray(positions, dtype=np.int64)].toarray()
        x = (rows - self.mean) / self.scale
        if self.missing is not None:
            x[:, self.missing] = 0.0
        return np.clip(x, -MAX_VALUE, MAX_VALUE, out=x).astype(np.float32, copy=False)

    def collate_fn(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(positions, dtype=np.int64)
        return {
            "x": torch.from_numpy(self.features(idx)),
            "labels": torch.from_numpy(self.labels[idx]),
        }


# ---------------------------------------------------------------------------------- runner


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
        self.task = resolve_task(model, task)
        self.model = model
        check_int(latent_dim, "latent_dim", minimum=1)
        if isinstance(hidden_dims, int | str) or not isinstance(hidden_dims, Sequence):
            msg = (
                "`hidden_dims` must be a sequence of layer widths such as (256, 128); "
                f"got {hidden_dims!r}."
            )
            raise ValueError(msg)
        for width in hidden_dims:
            check_int(width, "hidden_dims entries", minimum=1)
        check_int(epochs, "epochs", minimum=1)
        check_int(batch_size, "batch_size", minimum=1)
        check_int(random_state, "random_state", minimum=0)
        check_int(n_neighbors, "n_neighbors", minimum=1)
        check_number(lr, "lr", positive=True)
        check_number(weight_decay, "weight_decay", positive=False)
        check_number(kl_weight, "kl_weight", positive=False)
        check_number(dropout, "dropout", positive=False)
        if dropout >= 1:
            msg = f"`dropout` must be in [0, 1); got {dropout!r}."
            raise ValueError(msg)
        if early_stopping_patience is not None:
            check_int(early_stopping_patience, "early_stopping_patience", minimum=1)
        for name, value in (("val_size", val_size), ("test_size", test_size)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                msg = f"`{name}`={value!r} must be a fraction in [0, 1)."
                raise ValueError(msg)
        if val_size + test_size >= 1:
            msg = f"val_size + test_size = {val_size + test_size} leaves no cells for training."
            raise ValueError(msg)
        if class_weight not in ("auto", None, "balanced"):
            msg = f"`class_weight`={class_weight!r}; choose 'auto', None or 'balanced'."
            raise ValueError(msg)
        if class_weight == "auto":
            class_weight = "balanced" if self.task == "classification" else None
        if class_weight is not None and self.task != "classification":
            msg = "`class_weight` applies to task='classification' only; leave it as None."
            raise ValueError(msg)
        if precision not in {"auto", "fp32", "bf16"}:
            msg = f"`precision`={precision!r}; choose 'auto', 'fp32' or 'bf16'."
            raise ValueError(msg)
        if self.task == "classification" and label_key is None:
            msg = (
                "task='classification' needs label_key= naming the adata.obs column with the "
                "cell types."
            )
            raise ValueError(msg)
        for name, value in (("label_key", label_key), ("layer", layer), ("gene_key", gene_key)):
            if value is not None and not isinstance(value, str):
                msg = f"`{name}` must be a string or None; got {value!r}."
                raise ValueError(msg)
        self._check_device(device)
        self.latent_dim = int(latent_dim)
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.dropout = float(dropout)
        self.kl_weight = float(kl_weight)
        self.class_weight = class_weight
        self.device = device
        self.precision = precision
        self.label_key = label_key
        self.layer = layer
        self.gene_key = gene_key
        self.val_size = float(val_size)
        self.test_size = float(test_size)
        self.random_state = int(random_state)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.early_stopping_patience = early_stopping_patience
        self.n_neighbors = int(n_neighbors)
        self.progress = progress
        self.runner_dir_: Path | None = None
        self._fitted = False

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _check_device(device: Any) -> None:
        from scdlkit.foundation._device import resolve_device

        try:
            resolve_device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            msg = f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'."
            raise ValueError(msg) from err

    @property
    def _torch_device(self) -> torch.device:
        from scdlkit.foundation._device import resolve_device

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

    def _read_matrix(
        self, adata: Any, layer: str | None, gene_key: str | None
    ) -> tuple[sparse.csr_matrix, pd.Index]:
        """Validated, log-normalised cells x genes matrix and the gene names."""
        from scdlkit._shared.validation import gene_names, validate_values
        from scdlkit.baselines._expression import log_normalised_matrix

        if adata.n_obs == 0 or adata.n_vars == 0:
            msg = f"adata has shape {adata.shape}; it needs at least one cell and one gene."
            raise ValueError(msg)
        genes = gene_names(adata, gene_key)
        _unique_genes(genes, "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]")
        validate_values(adata, layer)
        return log_normalised_matrix(adata, layer), genes

    def _read_labels(self, adata: Any) -> tuple[np.ndarray, list[str]]:
        from scdlkit._shared.labels import encode_labels, read_label_column

        if self.label_key is None:
            return np.full(adata.n_obs, -1, dtype=np.int64), []
        encoded = encode_labels(read_label_column(adata.obs, self.label_key), min_classes=2)
        return encoded.codes, encoded.categories

    def _dataset(
        self, matrix: sparse.csr_matrix, labels: np.ndarray, missing: np.ndarray | None = None
    ) -> _ExpressionDataset:
        return _ExpressionDataset(matrix, self.mean_, self.scale_, labels, missing)

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
        from scdlkit.training import Trainer

        codes, categories = self._read_labels(adata)
        matrix, genes = self._read_matrix(adata, self.layer, self.gene_key)
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
        self.mean_, self.scale_ = _gene_statistics(matrix[splits["train"]])
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
        self, dataset: _ExpressionDataset, *, reconstruction: bool
    ) -> dict[str, np.ndarray]:
        """fp32 outputs for every cell of ``dataset``, in order."""
        from scdlkit._shared.progress import tqdm

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
        from scdlkit.training.metrics import classification_metrics

        if self.task == "classification":
            probabilities = _softmax(outputs["logits"][cells])
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
            probabilities = _softmax(outputs["logits"])
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
    ) -> _ExpressionDataset:
        matrix, genes = self._read_matrix(adata, layer, gene_key)
        position = genes.get_indexer(self.genes_)
        present = position >= 0
        if not present.any():
            msg = (
                f"none of the {len(self.genes_)} genes the model was trained on is in adata "
                f"(e.g. {', '.join(self.genes_[:3])}); check var_names or gene_key=."
            )
            raise ValueError(msg)
        if not present.all():
            logger.warning(
                "%d of %d model genes are missing from adata; they are set to the training mean.",
                int((~present).sum()),
                len(self.genes_),
            )
        cols = np.flatnonzero(present)
        selector = sparse.csr_matrix(
            (np.ones(len(cols), np.float32), (position[cols], cols)),
            shape=(matrix.shape[1], len(self.genes_)),
        )
        aligned = sparse.csr_matrix(matrix @ selector, dtype=np.float32)
        labels = np.full(adata.n_obs, -1, dtype=np.int64)
        return self._dataset(aligned, labels, ~present)

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
        layer = self.layer if layer is None else layer
        gene_key = self.gene_key if gene_key is None else gene_key
        dataset = self._query_dataset(adata, layer, gene_key)
        return self._forward(dataset, reconstruction=False)["latent"].astype(np.float32)

    # -------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Save atomically to the folder ``path``: ``manifest.json`` plus safetensors weights.

        The weights (model state and the per-gene standardisation) are written under a new
        content-addressed name first, then the manifest that names them (with their sha256)
        replaces the old one in one rename, then stale weights are removed; an interrupted save
        leaves the previous one intact. Nothing is pickled.

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
        from safetensors.torch import save_file

        from scdlkit._shared.provenance import package_versions
        from scdlkit.training.metrics import json_safe

        self._require_fitted("save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
            for k, v in self.model_.state_dict().items()
        }
        tensors["features.mean"] = torch.from_numpy(np.ascontiguousarray(self.mean_))
        tensors["features.scale"] = torch.from_numpy(np.ascontiguousarray(self.scale_))
        tmp_weights = path / f".weights-{os.getpid()}.tmp"
        save_file(tensors, str(tmp_weights))
        digest = sha256_file(tmp_weights)
        weights_name = f"weights-{digest[:16]}.safetensors"
        os.replace(tmp_weights, path / weights_name)
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
            "weights_file": weights_name,
            "weights_sha256": digest,
        }
        text = json.dumps(json_safe(manifest), indent=2, allow_nan=False)
        tmp_manifest = path / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
        tmp_manifest.write_text(text)
        os.replace(tmp_manifest, path / MANIFEST_NAME)
        for stale in path.glob("weights-*.safetensors"):
            if stale.name != weights_name:
                stale.unlink()
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
        path = Path(path)
        manifest = _read_manifest(path)
        tensors = read_checked_weights(path, manifest)
        file = path / MANIFEST_NAME
        params = dict(manifest["params"])
        kwargs = {k: v for k, v in params.items() if k in _PARAM_NAMES}
        if "hidden_dims" in kwargs:
            kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
        try:
            runner = cls(**kwargs, device=device, progress=False)
        except (TypeError, ValueError) as err:
            msg = f"{file}: the recorded params are invalid ({err})."
            raise ValueError(msg) from err
        if (runner.model, runner.task) != (manifest["model"], manifest["task"]):
            msg = f"{file}: params disagree with the recorded model and task."
            raise ValueError(msg)
        runner.genes_ = list(manifest["genes"])
        runner.label_categories_ = list(manifest["label_categories"])
        if manifest["model_config"] != runner._model_config():
            msg = f"{file}: model_config does not match the recorded params, genes and labels."
            raise ValueError(msg)
        n_genes = len(runner.genes_)
        stats = {}
        for name in ("mean", "scale"):
            tensor = tensors.pop(f"features.{name}", None)
            if tensor is None or tuple(tensor.shape) != (n_genes,):
                msg = f"{file}: the weights lack features.{name} of shape ({n_genes},)."
                raise ValueError(msg)
            stats[name] = tensor.numpy().astype(np.float32)
        finite = np.isfinite(stats["mean"]).all() and np.isfinite(stats["scale"]).all()
        if not (finite and (stats["scale"] > 0).all()):
            msg = f"{file}: features.mean/scale must be finite and the scale positive."
            raise ValueError(msg)
        runner.mean_, runner.scale_ = stats["mean"], stats["scale"]
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
            model = build_model(runner.model, runner._model_config())
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        extra = sorted(k for k in tensors if not k.startswith("model."))
        try:
            if extra:
                msg = f"unexpected tensors {extra[:5]}"
                raise RuntimeError(msg)
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            msg = f"{file}: the weights do not match the {runner.model} model ({err})."
            raise ValueError(msg) from err
        runner.model_ = model.eval()
        runner.metrics_ = {
            split: dict(manifest["metrics"].get(split) or {}) for split in ("validation", "test")
        }
        runner.history_ = _history_frame(manifest.get("history") or [])
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


_PARAM_NAMES = frozenset(
    {
        "model",
        "task",
        "latent_dim",
        "hidden_dims",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "dropout",
        "kl_weight",
        "class_weight",
        "precision",
        "label_key",
        "layer",
        "gene_key",
        "val_size",
        "test_size",
        "random_state",
        "early_stopping_patience",
        "n_neighbors",
    }
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _gene_statistics(matrix: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (1 where a gene is constant) in float64."""
    m = sparse.csr_matrix(matrix, dtype=np.float64)
    n = max(m.shape[0], 1)
    mean = np.asarray(m.sum(axis=0)).ravel() / n
    square = np.asarray(m.multiply(m).sum(axis=0)).ravel() / n
    std = np.sqrt(np.maximum(square - mean**2, 0.0))
    scale = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def _history_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """History back from JSON: ``null`` becomes NaN again."""
    frame = pd.DataFrame(records)
    for column in frame.columns:
        frame[column] = pd.to_numeric(frame[column])
    if "epoch" in frame.columns:
        frame["epoch"] = frame["epoch"].astype(int)
    return frame


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json``; errors name the problem."""
    manifest = read_manifest_file(
        path, _REQUIRED, schema_version=SCHEMA_VERSION, what="TaskRunner", kind=KIND
    )
    file = path / MANIFEST_NAME
    try:
        resolve_task(manifest["model"], manifest["task"])
    except ValueError as err:
        msg = f"{file}: {err}"
        raise ValueError(msg) from err
    for key in ("genes", "label_categories"):
        if not all(isinstance(v, str) for v in manifest[key]):
            msg = f"{file}: field {key!r} must be a list of strings."
            raise ValueError(msg)
    if len(set(manifest["genes"])) != len(manifest["genes"]) or not manifest["genes"]:
        msg = f"{file}: field 'genes' must be a non-empty list of unique names."
        raise ValueError(msg)
    if Path(manifest["weights_file"]).name != manifest["weights_file"]:
        msg = f"{file}: weights_file must be a file name inside the runner folder."
        raise ValueError(msg)
    return manifest
