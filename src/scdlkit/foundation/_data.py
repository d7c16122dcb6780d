"""Prepared data (tokenised once) and reproducible train/validation/test splits."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scdlkit.foundation._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation._genes import tokenize_adata
from scdlkit.foundation._labels import EncodedLabels, encode_labels, read_label_column
from scdlkit.foundation._tokenize import ScGPTTokens, collate_tokens, length_grouped_batches

__all__ = [
    "ScGPTCellDataset",
    "ScGPTPreparedData",
    "ScGPTSplitData",
    "prepare_scgpt_data",
    "split_scgpt_data",
]

logger = logging.getLogger("scdlkit")

SPLIT_NAMES = ("train", "val", "test")
#: A class needs this many labelled cells to appear in train, validation and test.
MIN_CELLS_TO_STRATIFY = 3


class ScGPTCellDataset(Dataset):
    """Cells of a tokenised AnnData, following the :class:`~scdlkit.Trainer` batch protocol.

    Items are cell positions; :meth:`collate_fn` pads them into model input plus ``labels``, and
    :meth:`batches` groups cells of similar length so padding costs little.
    """

    def __init__(self, tokens: ScGPTTokens, cells: np.ndarray, labels: np.ndarray) -> None:
        self.tokens = tokens
        self.cells = np.asarray(cells, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate_fn(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        batch = collate_tokens(self.tokens, self.cells[positions])
        batch["labels"] = torch.from_numpy(self.labels[positions])
        return batch

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterable[np.ndarray]:
        return length_grouped_batches(
            self.tokens.lengths[self.cells], batch_size, shuffle=shuffle, seed=seed, epoch=epoch
        )


@dataclass
class ScGPTPreparedData:
    """An AnnData tokenised once for one checkpoint, with its labels encoded.

    Attributes
    ----------
    tokens
        Compact tokens of every cell (:class:`~scdlkit.foundation.ScGPTTokens`).
    label_codes
        ``(n_cells,)`` int64, -1 for unlabelled cells (or all -1 without ``label_key``).
    label_categories
        Class names in code order.
    matched_genes
        Gene symbols found in the vocabulary, in ``var`` order.
    n_genes_input
        Genes in the AnnData.
    checkpoint
        The resolved checkpoint (its vocabulary and arguments; weights not read).
    obs_names
        Cell names, to align results with the AnnData.
    settings
        The arguments that shaped the tokens (gene_key, layer, label_key, seed, ...).
    """

    tokens: ScGPTTokens
    label_codes: np.ndarray
    label_categories: list[str]
    matched_genes: list[str]
    n_genes_input: int
    checkpoint: ScGPTCheckpoint
    obs_names: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return self.tokens.n_cells

    @property
    def labelled(self) -> np.ndarray:
        return self.label_codes >= 0

    @property
    def checkpoint_id(self) -> str:
        return self.checkpoint.name

    def dataset(self, cells: np.ndarray | None = None) -> ScGPTCellDataset:
        """A torch Dataset over ``cells`` (default: all cells)."""
        cells = np.arange(self.n_cells) if cells is None else np.asarray(cells)
        return ScGPTCellDataset(self.tokens, cells, self.label_codes[cells])

    def __repr__(self) -> str:
        return (
            f"ScGPTPreparedData({self.n_cells} cells, {len(self.matched_genes)}/"
            f"{self.n_genes_input} genes matched, {len(self.label_categories)} classes, "
            f"{int((~self.labelled).sum())} unlabelled, checkpoint={self.checkpoint_id!r})"
        )


def prepare_scgpt_data(
    adata: Any,
    *,
    checkpoint: str | os.PathLike | ScGPTCheckpoint = "whole-human",
    label_key: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    min_gene_overlap: int | float = 100,
    label_categories: list[str] | None = None,
    random_state: int = 42,
    progress: bool = False,
) -> ScGPTPreparedData:
    """Validate and tokenise an AnnData once, for every strategy and prediction to reuse.

    Parameters
    ----------
    adata
        Cells x genes; raw counts or log-normalised values (non-negative), gene symbols.
    checkpoint
        Official checkpoint name or folder; only ``vocab.json`` and ``args.json`` are read.
    label_key
        ``adata.obs`` column with cell types. Missing values (NaN, None, "") mark unlabelled
        cells, which get no split but still get predictions. ``None`` for unlabelled query data.
    gene_key
        ``adata.var`` column with gene symbols; default ``var_names``.
    layer
        Layer holding the values; default ``adata.X``.
    batch_size
        Default batch size recorded for later steps.
    min_gene_overlap
        Least number of genes (int), or fraction of the input genes (float below 1), that must be
        in the vocabulary. scGPT sees only matched genes; below a few hundred, embeddings degrade.
    label_categories
        Fix the classes (a fitted model's); labels outside them count as unlabelled.
    random_state
        Seeds binning ties and gene subsampling above ``max_seq_len``.
    progress
        Show a progress bar while tokenising.

    Returns
    -------
    :class:`ScGPTPreparedData`

    Raises
    ------
    KeyError
        ``label_key``, ``gene_key`` or ``layer`` not found.
    ValueError
        Negative or non-finite values, too little gene overlap, Ensembl ids without ``gene_key``,
        fewer than two labelled classes. The AnnData is never modified.

    Examples
    --------
    >>> prepared = sck.foundation.prepare_scgpt_data(
    ...     adata, checkpoint="whole-human", label_key="cell_type"
    ... )  # doctest: +SKIP
    >>> splits = sck.foundation.split_scgpt_data(prepared, random_state=0)  # doctest: +SKIP
    """
    ckpt = resolve_checkpoint(checkpoint)
    if label_key is not None:
        labels: EncodedLabels = encode_labels(
            read_label_column(adata.obs, label_key), categories=label_categories
        )
    else:
        labels = EncodedLabels(np.full(adata.n_obs, -1, np.int64), list(label_categories or []))
    tokens, match = tokenize_adata(
        adata,
        ckpt,
        gene_key=gene_key,
        layer=layer,
        min_gene_overlap=min_gene_overlap,
        seed=random_state,
        progress=progress,
    )
    return ScGPTPreparedData(
        tokens=tokens,
        label_codes=labels.codes,
        label_categories=labels.categories,
        matched_genes=match.matched,
        n_genes_input=len(match.names),
        checkpoint=ckpt,
        obs_names=np.asarray(adata.obs_names),
        settings={
            "label_key": label_key or "",
            "gene_key": gene_key or "",
            "layer": layer or "",
            "batch_size": batch_size,
            "min_gene_overlap": min_gene_overlap,
            "random_state": random_state,
        },
    )


@dataclass
class ScGPTSplitData:
    """Train/validation/test datasets over one :class:`ScGPTPreparedData` (no re-tokenisation).

    Attributes
    ----------
    train, val, test
        :class:`ScGPTCellDataset` objects.
    train_indices, val_indices, test_indices
        Cell positions in the AnnData.
    stratified
        Whether the split was stratified by label.
    small_classes
        Classes with fewer than 3 labelled cells, put entirely into ``train``.
    """

    prepared: ScGPTPreparedData
    train_indices: np.ndarray
    val_indices: np.ndarray
    test_indices: np.ndarray
    random_state: int
    stratified: bool
    small_classes: list[str] = field(default_factory=list)

    @property
    def train(self) -> ScGPTCellDataset:
        return self.prepared.dataset(self.train_indices)

    @property
    def val(self) -> ScGPTCellDataset:
        return self.prepared.dataset(self.val_indices)

    @property
    def test(self) -> ScGPTCellDataset:
        return self.prepared.dataset(self.test_indices)

    def indices(self, name: str) -> np.ndarray:
        return {"train": self.train_indices, "val": self.val_indices, "test": self.test_indices}[name]

    def split_labels(self) -> np.ndarray:
        """Per cell: ``"train"``, ``"val"``, ``"test"`` or ``"unlabelled"``."""
        out = np.full(self.prepared.n_cells, "unlabelled", dtype=object)
        for name in SPLIT_NAMES:
            out[self.indices(name)] = name
        return out

    def __repr__(self) -> str:
        return (
            f"ScGPTSplitData(train={len(self.train_indices)}, val={len(self.val_indices)}, "
            f"test={len(self.test_indices)}, stratified={self.stratified}, "
            f"random_state={self.random_state})"
        )


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        msg = f"{name}={value} must be a fraction in [0, 1)."
        raise ValueError(msg)


def _allocate(n: int, val_size: float, test_size: float) -> tuple[int, int]:
    """Validation and test counts for a class of ``n`` cells; each split gets one where possible."""
    n_test = round(n * test_size)
    n_val = round(n * val_size)
    if test_size > 0:
        n_test = max(n_test, 1)
    if val_size > 0:
        n_val = max(n_val, 1)
    while n_test + n_val > n - 1:  # keep at least one training cell
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_scgpt_data(
    prepared: ScGPTPreparedData,
    *,
    val_size: float = 0.15,
    test_size: float = 0.15,
    random_state: int = 42,
    stratify: bool = True,
) -> ScGPTSplitData:
    """Split the labelled cells into train, validation and test sets.

    Unlabelled cells go in no split. With ``stratify`` each class is split in the given
    proportions (at least one cell per split when the class has 3 or more). Fallback for small
    classes: a class with fewer than 3 labelled cells cannot appear in all three splits, so all its
    cells go to ``train`` and a warning is logged; its validation/test metrics are then undefined.

    Parameters
    ----------
    prepared
        Output of :func:`prepare_scgpt_data` with labels.
    val_size, test_size
        Fractions of the labelled cells (0 allowed; their sum must be below 1).
    random_state
        Same value, same split.
    stratify
        Split each class separately (default) or all labelled cells together.

    Returns
    -------
    :class:`ScGPTSplitData`

    Examples
    --------
    >>> splits = sck.foundation.split_scgpt_data(prepared, val_size=0.1, test_size=0.2)  # doctest: +SKIP
    >>> len(splits.train), len(splits.test)  # doctest: +SKIP
    """
    _check_fraction("val_size", val_size)
    _check_fraction("test_size", test_size)
    if val_size + test_size >= 1:
        msg = f"val_size + test_size = {val_size + test_size} leaves no cells for training."
        raise ValueError(msg)
    labelled = np.flatnonzero(prepared.labelled)
    if len(labelled) == 0:
        msg = "prepared data has no labelled cells: pass label_key= to prepare_scgpt_data."
        raise ValueError(msg)
    rng = np.random.default_rng(random_state)
    codes = prepared.label_codes
    groups = [labelled[codes[labelled] == c] for c in range(len(prepared.label_categories))]
    if not stratify:
        groups = [labelled]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    small = []
    for class_code, cells in enumerate(groups):
        cells = rng.permutation(cells)
        if stratify and len(cells) < MIN_CELLS_TO_STRATIFY and (val_size or test_size):
            if len(cells):
                small.append(prepared.label_categories[class_code])
            parts["train"].append(cells)
            continue
        n_val, n_test = _allocate(len(cells), val_size, test_size)
        parts["test"].append(cells[:n_test])
        parts["val"].append(cells[n_test : n_test + n_val])
        parts["train"].append(cells[n_test + n_val :])
    if small:
        msg = (
            f"classes with fewer than {MIN_CELLS_TO_STRATIFY} labelled cells go entirely to the "
            f"training split (their validation/test metrics are undefined): {', '.join(small)}"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    indices = {
        name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for name, p in parts.items()
    }
    return ScGPTSplitData(
        prepared=prepared,
        train_indices=indices["train"],
        val_indices=indices["val"],
        test_indices=indices["test"],
        random_state=random_state,
        stratified=stratify,
        small_classes=small,
    )
