"""Prepared data (tokenised once) and reproducible train/validation/test splits."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scdlkit._shared.labels import (
    EncodedLabels,
    encode_labels,
    read_batch_column,
    read_label_column,
    require_classes,
)
from scdlkit._shared.splits import (
    MIN_CELLS_TO_STRATIFY,
    SPLIT_NAMES,
    choose_held_out,
    stratified_split,
)
from scdlkit.foundation._batching import length_grouped_batches
from scdlkit.foundation.models import model_card, resolve_model_checkpoint
from scdlkit.foundation.models._contract import ModelCheckpoint, TokenStore

if TYPE_CHECKING:  # _inspect imports this module's constants
    from scdlkit.foundation._inspect import Preflight

__all__ = [
    "ScGPTCellDataset",
    "ScGPTPreparedData",
    "ScGPTSplitData",
    "prepare_preflighted",
    "prepare_scgpt_data",
    "split_scgpt_data",
]

logger = logging.getLogger("scdlkit")

#: Genes of the data that must be in the vocabulary (scGPT sees only those).
MIN_GENE_OVERLAP = 100


class ScGPTCellDataset(Dataset):
    """Cells of a tokenised AnnData, following the :class:`~scdlkit.Trainer` batch protocol.

    Items are cell positions; :meth:`collate_fn` pads them into model input plus ``labels``, and
    :meth:`batches` groups cells of similar length so padding costs little.
    """

    def __init__(self, tokens: TokenStore, cells: np.ndarray, labels: np.ndarray) -> None:
        self.tokens = tokens
        self.cells = np.asarray(cells, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def collate_fn(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the cells at ``positions`` into one model batch with their labels.

        Parameters
        ----------
        positions
            Positions into this dataset (``0..len(self) - 1``), not cell positions in the AnnData.

        Returns
        -------
        dict of str to torch.Tensor
            ``gene_ids`` (int64) and ``values`` (float32), both ``(n, width)`` with ``<cls>`` first
            and padding to the longest cell in the batch; ``padding_mask`` (bool, True at pad);
            ``labels`` (int64, ``(n,)``, -1 for unlabelled cells).
        """
        positions = np.asarray(positions, dtype=np.int64)
        batch = self.tokens.collate(self.cells[positions])
        batch["labels"] = torch.from_numpy(self.labels[positions])
        return batch

    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> Iterable[np.ndarray]:
        """Batches of dataset positions, grouping cells of similar length to limit padding.

        Parameters
        ----------
        batch_size
            Cells per batch (the last batch of a group may be smaller).
        shuffle
            ``False``: longest cells first, in fixed batches. ``True``: cells shuffled, sorted by
            length within mega-batches of 50 batches, batches yielded in random order.
        seed, epoch
            Seed the shuffle; each epoch gives different batches.

        Returns
        -------
        Iterable of numpy.ndarray
            Positions into this dataset, one array per batch; every cell appears exactly once.
        """
        return length_grouped_batches(
            self.tokens.lengths[self.cells], batch_size, shuffle=shuffle, seed=seed, epoch=epoch
        )


@dataclass
class ScGPTPreparedData:
    """An AnnData tokenised once for one checkpoint, with its labels encoded.

    Attributes
    ----------
    tokens
        Compact tokens of every cell: the model's token store (the ``TokenStore`` contract of
        :mod:`scdlkit.foundation.models`).
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
    batch_size
        The batch size prepared for (read-only, from ``settings``).
    batches
        Batch (donor, study, ...) of each cell as strings, when ``batch_key`` was given.
    """

    tokens: TokenStore
    label_codes: np.ndarray
    label_categories: list[str]
    matched_genes: list[str]
    n_genes_input: int
    checkpoint: ModelCheckpoint
    obs_names: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    batches: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """Number of cells (all of the AnnData's, labelled or not)."""
        return self.tokens.n_cells

    @property
    def batch_size(self) -> int:
        """The batch size the data was prepared for (``prepare_scgpt_data(batch_size=...)``),
        e.g. for ``Trainer(model, batch_size=prepared.batch_size)``."""
        return int(self.settings.get("batch_size", 64))

    @property
    def labelled(self) -> np.ndarray:
        """``(n_cells,)`` bool, True for cells with a label (``label_codes >= 0``)."""
        return self.label_codes >= 0

    @property
    def checkpoint_id(self) -> str:
        """Name of the checkpoint the tokens were made for (``checkpoint.name``)."""
        return self.checkpoint.name

    def dataset(self, cells: np.ndarray | None = None) -> ScGPTCellDataset:
        """A torch Dataset over ``cells`` (default: all cells).

        Parameters
        ----------
        cells
            Cell positions in the AnnData (integer array); ``None`` for all cells.

        Returns
        -------
        ScGPTCellDataset
            Shares the tokens (no copy); labels are ``label_codes[cells]``, -1 where unlabelled.

        Examples
        --------
        >>> ds = prepared.dataset(np.flatnonzero(prepared.labelled))  # doctest: +SKIP
        >>> batch = ds.collate_fn(range(8))  # doctest: +SKIP
        """
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
    checkpoint: str | os.PathLike | ModelCheckpoint = "whole-human",
    label_key: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    min_gene_overlap: int | float = MIN_GENE_OVERLAP,
    label_categories: list[str] | None = None,
    batch_key: str | None = None,
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
    batch_key
        ``adata.obs`` column with the batch, donor or study of each cell, carried through for
        batch-aware splits and per-batch metrics. Missing values are an error.
    random_state
        Seeds binning ties and gene subsampling above ``max_seq_len``.
    progress
        Show a progress bar while tokenising.

    Returns
    -------
    ScGPTPreparedData
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
    ckpt = resolve_model_checkpoint(checkpoint)
    batches = read_batch_column(adata.obs, batch_key) if batch_key is not None else None
    if label_key is not None:
        labels: EncodedLabels = encode_labels(
            read_label_column(adata.obs, label_key), categories=label_categories
        )
    else:
        labels = EncodedLabels(np.full(adata.n_obs, -1, np.int64), list(label_categories or []))
    return _tokenised(
        adata,
        ckpt,
        labels=labels,
        batches=batches,
        match=None,
        label_key=label_key,
        batch_key=batch_key,
        gene_key=gene_key,
        layer=layer,
        batch_size=batch_size,
        min_gene_overlap=min_gene_overlap,
        random_state=random_state,
        progress=progress,
    )


def prepare_preflighted(
    adata: Any, preflight: Preflight, *, batch_size: int, random_state: int, progress: bool
) -> ScGPTPreparedData:
    """:func:`prepare_scgpt_data` for an AnnData the preflight has read: its gene match,
    encoded labels and batches are used as they are, so only tokenising reads the data again."""
    if preflight.labels is not None:
        require_classes(preflight.labels.categories)
        labels = preflight.labels
    else:
        labels = EncodedLabels(np.full(preflight.n_cells, -1, np.int64), [])
    return _tokenised(
        adata,
        preflight.checkpoint,
        labels=labels,
        batches=preflight.batches,
        match=preflight.match,
        label_key=preflight.label_key,
        batch_key=preflight.batch_key,
        gene_key=preflight.gene_key,
        layer=preflight.layer,
        batch_size=batch_size,
        min_gene_overlap=preflight.min_gene_overlap,
        random_state=random_state,
        progress=progress,
    )


def _tokenised(
    adata: Any,
    ckpt: ModelCheckpoint,
    *,
    labels: EncodedLabels,
    batches: np.ndarray | None,
    match: Any,
    label_key: str | None,
    batch_key: str | None,
    gene_key: str | None,
    layer: str | None,
    batch_size: int,
    min_gene_overlap: int | float,
    random_state: int,
    progress: bool,
) -> ScGPTPreparedData:
    tokens, match = model_card(ckpt).tokenize(
        adata,
        ckpt,
        gene_key=gene_key,
        layer=layer,
        min_gene_overlap=min_gene_overlap,
        seed=random_state,
        progress=progress,
        match=match,  # the preflight's gene match, if one was made
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
            "batch_key": batch_key or "",
            "gene_key": gene_key or "",
            "layer": layer or "",
            "batch_size": batch_size,
            "min_gene_overlap": min_gene_overlap,
            "random_state": random_state,
        },
        batches=batches,
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
    split_by
        ``"cells"`` or ``"batch"``.
    test_batches, val_batches
        Held-out batches (``split_by="batch"``).
    """

    prepared: ScGPTPreparedData
    train_indices: np.ndarray
    val_indices: np.ndarray
    test_indices: np.ndarray
    random_state: int
    stratified: bool
    small_classes: list[str] = field(default_factory=list)
    split_by: str = "cells"
    test_batches: list[str] = field(default_factory=list)
    val_batches: list[str] = field(default_factory=list)
    calibration_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    calibration_batches: list[str] = field(default_factory=list)

    @property
    def train(self) -> ScGPTCellDataset:
        """Dataset over ``train_indices`` (built on each access, tokens shared)."""
        return self.prepared.dataset(self.train_indices)

    @property
    def val(self) -> ScGPTCellDataset:
        """Dataset over ``val_indices`` (built on each access, tokens shared)."""
        return self.prepared.dataset(self.val_indices)

    @property
    def test(self) -> ScGPTCellDataset:
        """Dataset over ``test_indices`` (built on each access, tokens shared)."""
        return self.prepared.dataset(self.test_indices)

    def indices(self, name: str) -> np.ndarray:
        """Cell positions in the AnnData of one split.

        Parameters
        ----------
        name
            ``"train"``, ``"val"``, ``"test"`` or ``"calibration"``.

        Returns
        -------
        numpy.ndarray
            ``train_indices``, ``val_indices``, ``test_indices`` or ``calibration_indices``.

        Raises
        ------
        KeyError
            For any other ``name``.
        """
        return {
            "train": self.train_indices,
            "val": self.val_indices,
            "test": self.test_indices,
            "calibration": self.calibration_indices,
        }[name]

    def split_labels(self) -> np.ndarray:
        """Per cell: ``"train"``, ``"val"``, ``"test"``, ``"calibration"`` or ``"unlabelled"``.

        Returns
        -------
        numpy.ndarray
            ``(n_cells,)`` object array over every cell of the prepared data; cells in no split
            (unlabelled ones) are ``"unlabelled"``.
        """
        out = np.full(self.prepared.n_cells, "unlabelled", dtype=object)
        for name in (*SPLIT_NAMES, "calibration"):
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


def _split_labelled(
    prepared: ScGPTPreparedData,
    cells: np.ndarray,
    *,
    val_size: float,
    test_size: float,
    rng: np.random.Generator,
    stratify: bool,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Stratified (or plain) split of labelled ``cells``; small classes come back by name."""
    indices, small = stratified_split(
        cells,
        prepared.label_codes[cells] if stratify else None,
        val_size=val_size,
        test_size=test_size,
        random_state=rng,
        min_cells=MIN_CELLS_TO_STRATIFY if stratify else 0,
    )
    return indices, [prepared.label_categories[code] for code in small]


def split_scgpt_data(
    prepared: ScGPTPreparedData,
    *,
    val_size: float = 0.15,
    test_size: float = 0.15,
    random_state: int = 42,
    stratify: bool = True,
    split_by: str = "cells",
    test_batches: Sequence[str] | None = None,
    val_batches: Sequence[str] | None = None,
    fixed_test: np.ndarray | None = None,
    reserved_batches: Sequence[str] = (),
) -> ScGPTSplitData:
    """Split the labelled cells into train, validation and test sets.

    Unlabelled cells go in no split. With ``split_by="cells"`` (default) and ``stratify`` each
    class is split in the given proportions (at least one cell per split when the class has 3 or
    more). Fallback for small classes: a class with fewer than 3 labelled cells cannot appear in
    all three splits, so all its cells go to ``train`` and a warning is issued; its
    validation/test metrics are then undefined.

    With ``split_by="batch"`` whole batches (donors, studies; ``batch_key`` of
    :func:`prepare_scgpt_data`) are held out, so test metrics say how well a new batch is
    labelled. Test batches are ``test_batches`` or, by default, ``round(n_batches * test_size)``
    batches (at least one) drawn with ``random_state``. Validation cells are a stratified
    ``val_size`` share of the remaining batches' cells, so every non-test batch trains (with 3
    donors and one held out for test, the model trains on two); name ``val_batches`` to hold out
    whole validation batches instead.

    Parameters
    ----------
    prepared
        Output of :func:`prepare_scgpt_data` with labels.
    val_size, test_size
        Fractions of the labelled cells (``split_by="cells"``) or of the batches
        (``split_by="batch"``); 0 allowed, their sum must be below 1.
    random_state
        Same value, same split.
    stratify
        Split each class separately (default) or all labelled cells together.
    split_by
        ``"cells"`` or ``"batch"``.
    test_batches, val_batches
        Batches to hold out by name (``split_by="batch"`` only).
    fixed_test
        Test cells to keep (another split's ``test_indices``): only training and validation are
        drawn, from the other labelled cells, with validation still ``val_size`` of all labelled
        cells (``split_by="cells"``) or of the non-test batches' cells. Repeats of a comparison
        pass their first split's test cells here, so one outer test set serves them all and no
        test cell ever validates.

    Returns
    -------
    ScGPTSplitData
        :class:`ScGPTSplitData`

    Examples
    --------
    >>> splits = sck.foundation.split_scgpt_data(
    ...     prepared, val_size=0.1, test_size=0.2
    ... )  # doctest: +SKIP
    >>> by_donor = sck.foundation.split_scgpt_data(
    ...     prepared, split_by="batch", test_batches=["donor3"]
    ... )  # doctest: +SKIP
    """
    _check_fraction("val_size", val_size)
    _check_fraction("test_size", test_size)
    if val_size + test_size >= 1:
        msg = f"val_size + test_size = {val_size + test_size} leaves no cells for training."
        raise ValueError(msg)
    if split_by not in {"cells", "batch"}:
        msg = f"split_by={split_by!r}; choose 'cells' or 'batch'."
        raise ValueError(msg)
    if split_by == "cells" and (test_batches is not None or val_batches is not None):
        msg = "test_batches/val_batches need split_by='batch'."
        raise ValueError(msg)
    labelled = np.flatnonzero(prepared.labelled)
    if len(labelled) == 0:
        msg = "prepared data has no labelled cells: pass label_key= to prepare_scgpt_data."
        raise ValueError(msg)
    rng = np.random.default_rng(random_state)
    chosen: dict[str, list[str]] = {"test": [], "val": []}
    if fixed_test is not None:
        fixed_test = np.sort(np.asarray(fixed_test, dtype=np.int64))
        if not np.isin(fixed_test, labelled).all():
            msg = "fixed_test holds cells that are not labelled cells of this prepared data."
            raise ValueError(msg)
    if split_by == "cells" and fixed_test is not None:
        pool = np.setdiff1d(labelled, fixed_test)
        inner_val = val_size / (1 - test_size) if test_size < 1 else val_size
        indices, small = _split_labelled(
            prepared, pool, val_size=min(inner_val, 0.99), test_size=0.0, rng=rng, stratify=stratify
        )
        indices["test"] = fixed_test
    elif split_by == "cells":
        indices, small = _split_labelled(
            prepared, labelled, val_size=val_size, test_size=test_size, rng=rng, stratify=stratify
        )
    else:
        if prepared.batches is None:
            msg = "split_by='batch' needs batch_key= in prepare_scgpt_data (or the runner)."
            raise ValueError(msg)
        batch_of = prepared.batches
        names = sorted(set(batch_of[labelled]))
        if len(names) < 2:
            msg = (
                f"split_by='batch' needs at least 2 batches with labelled cells; found "
                f"{len(names)} ({', '.join(names)}). Use split_by='cells'."
            )
            raise ValueError(msg)
        # batches reserved for another role (calibration) are never drawn for test or validation
        drawable = [b for b in names if b not in set(reserved_batches)] or names
        if fixed_test is not None:
            chosen["test"] = sorted(set(batch_of[fixed_test]))
        elif test_batches is None:
            chosen["test"] = choose_held_out(drawable, None, test_size, rng, role="test")
        else:
            chosen["test"] = choose_held_out(names, test_batches, test_size, rng, role="test")
        rest = [b for b in names if b not in chosen["test"]]
        if not rest:
            msg = "every batch is a test batch; leave at least one for training."
            raise ValueError(msg)
        if val_batches is not None:
            chosen["val"] = choose_held_out(rest, val_batches, val_size, rng, role="val")
            if set(chosen["val"]) & set(chosen["test"]):
                msg = "val_batches and test_batches overlap."
                raise ValueError(msg)
            if len(chosen["val"]) >= len(rest):
                chosen["val"] = chosen["val"][: len(rest) - 1]
        is_test = np.isin(batch_of[labelled], chosen["test"])
        is_val = np.isin(batch_of[labelled], chosen["val"])
        train_pool = labelled[~is_test & ~is_val]
        indices = {"test": labelled[is_test], "val": labelled[is_val], "train": train_pool}
        small = []
        if not chosen["val"] and val_size > 0:
            inner, small = _split_labelled(
                prepared, train_pool, val_size=val_size, test_size=0.0, rng=rng, stratify=stratify
            )
            indices["train"], indices["val"] = inner["train"], inner["val"]
    if small:
        msg = (
            f"classes with fewer than {MIN_CELLS_TO_STRATIFY} labelled cells go entirely to the "
            f"training split (their validation/test metrics are undefined): {', '.join(small)}"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    return ScGPTSplitData(
        prepared=prepared,
        train_indices=indices["train"],
        val_indices=indices["val"],
        test_indices=indices["test"],
        random_state=random_state,
        stratified=stratify,
        small_classes=small,
        split_by=split_by,
        test_batches=chosen["test"],
        val_batches=chosen["val"],
    )
