"""Preflight: does this AnnData fit scGPT? Reads vocab.json and args.json, never the weights."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scdlkit._shared.labels import (
    EncodedLabels,
    encode_labels,
    read_batch_column,
    read_label_column,
)
from scdlkit._shared.validation import (
    describe_values,
    get_matrix,
    iter_row_chunks,
    looks_like_ensembl,
)
from scdlkit.foundation._data import MIN_CELLS_TO_STRATIFY, MIN_GENE_OVERLAP
from scdlkit.foundation.models import model_card, resolve_model_checkpoint
from scdlkit.foundation.models._contract import ModelCheckpoint

__all__ = [
    "Preflight",
    "ScGPTAnnotationDataReport",
    "inspect_annotation_data",
    "preflight_data",
    "preflight_report",
]

UNMATCHED_SAMPLE = 20
LOW_OVERLAP = 0.5


@dataclass
class ScGPTAnnotationDataReport:
    """What the preflight found. ``problems`` block training; ``warnings`` deserve a look.

    Every problem and warning says how to fix it. :meth:`to_dict` gives a plain dict that
    ``sck.tl.inspect`` stores in ``adata.uns`` (it survives ``write_h5ad``/``write_zarr``).
    """

    checkpoint: str
    n_cells: int
    n_genes_input: int
    n_genes_matched: int
    gene_match_ratio: float
    n_genes_unmatched: int
    unmatched_genes_sample: list[str]
    gene_key: str
    layer: str
    value_kind: str
    expressed_genes_median: float
    expressed_genes_max: int
    max_seq_len: int
    n_cells_over_max_seq_len: int
    label_key: str
    label_categories: list[str] = field(default_factory=list)
    label_counts: list[int] = field(default_factory=list)
    n_unlabelled: int = 0
    stratified_split_possible: bool = False
    batch_key: str = ""
    batch_names: list[str] = field(default_factory=list)
    batch_cell_counts: list[int] = field(default_factory=list)
    batch_class_counts: list[int] = field(default_factory=list)
    classes_in_one_batch: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No blocking problem found."""
        return not self.problems

    @property
    def n_classes(self) -> int:
        return len(self.label_categories)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (str, int, float, bool, lists), ready for ``adata.uns`` or JSON."""
        out = asdict(self)
        out["ok"] = self.ok
        out["n_classes"] = self.n_classes
        return out

    def __repr__(self) -> str:
        lines = [
            f"scGPT preflight ({'ok' if self.ok else 'PROBLEMS FOUND'}), "
            f"checkpoint {self.checkpoint!r}",
            f"  cells: {self.n_cells}",
            f"  genes: {self.n_genes_matched} of {self.n_genes_input} in the vocabulary "
            f"({self.gene_match_ratio:.1%})",
            f"  values: {self.value_kind}",
            f"  expressed genes per cell: median {self.expressed_genes_median:g}, max "
            f"{self.expressed_genes_max} (max_seq_len {self.max_seq_len}; "
            f"{self.n_cells_over_max_seq_len} cells subsampled)",
        ]
        if self.label_key:
            counts = ", ".join(
                f"{c} ({n})" for c, n in zip(self.label_categories, self.label_counts, strict=True)
            )
            lines += [
                f"  labels ({self.label_key!r}): {self.n_classes} classes, "
                f"{self.n_unlabelled} unlabelled cells",
                f"    {counts}",
                f"  stratified split possible: {self.stratified_split_possible}",
            ]
        if self.batch_key:
            per_batch = ", ".join(
                f"{b} ({n} cells, {k} classes)"
                for b, n, k in zip(
                    self.batch_names, self.batch_cell_counts, self.batch_class_counts, strict=True
                )
            )
            lines.append(f"  batches ({self.batch_key!r}): {per_batch}")
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _expressed_per_cell(adata: Any, layer: str | None, matched: np.ndarray) -> np.ndarray:
    columns = np.flatnonzero(matched)
    counts = []
    for _, block in iter_row_chunks(get_matrix(adata, layer)):
        block = block[:, columns]
        block.eliminate_zeros()
        counts.append(np.diff(block.indptr))
    return np.concatenate(counts) if counts else np.zeros(0, np.int64)


def inspect_annotation_data(
    adata: Any,
    *,
    label_key: str | None,
    checkpoint: str | os.PathLike | ModelCheckpoint = "whole-human",
    gene_key: str | None = None,
    layer: str | None = None,
    min_gene_overlap: int | float = MIN_GENE_OVERLAP,
    batch_key: str | None = None,
    expressed_per_cell: np.ndarray | None = None,
) -> ScGPTAnnotationDataReport:
    """Check whether an AnnData fits scGPT before any training.

    Reads the checkpoint's ``vocab.json`` and ``args.json`` only (never the weights) and reports
    gene overlap, labels, value type and sequence lengths, with a fix for every problem. Data
    problems are reported, not raised, so one call shows all of them; arguments that name
    something absent (``label_key``, ``gene_key``, ``layer``) raise.

    Parameters
    ----------
    adata
        Cells x genes with gene symbols.
    label_key
        ``adata.obs`` column with cell types, or ``None`` to check genes and values only.
    checkpoint
        Official checkpoint name or a checkpoint folder.
    gene_key
        ``adata.var`` column with gene symbols; default ``var_names``.
    layer
        Layer holding the values; default ``adata.X``.
    min_gene_overlap
        Matched genes needed (int) or fraction of input genes (float below 1).
    batch_key
        ``adata.obs`` column with the batch/donor/study: reports cells and classes per batch and
        warns about classes seen in one batch only (a batch-held-out test cannot score them
        fairly). Missing values are an error.
    expressed_per_cell
        Matched genes expressed per cell, when already known (the tokens of
        :func:`~scdlkit.foundation.prepare_scgpt_data` hold them): spares a pass over the data.

    Returns
    -------
    ScGPTAnnotationDataReport
        :class:`ScGPTAnnotationDataReport`

    Raises
    ------
    KeyError
        ``label_key``, ``gene_key``, ``layer`` or ``batch_key`` not found.
    ValueError
        ``batch_key`` has missing values.

    Examples
    --------
    >>> report = sck.inspect_annotation_data(adata, label_key="cell_type")  # doctest: +SKIP
    >>> report.ok, report.n_genes_matched  # doctest: +SKIP
    """
    pre = preflight_data(
        adata,
        label_key=label_key,
        checkpoint=checkpoint,
        gene_key=gene_key,
        layer=layer,
        min_gene_overlap=min_gene_overlap,
        batch_key=batch_key,
    )
    if expressed_per_cell is None and pre.value_kind not in {"non_finite", "empty"}:
        expressed_per_cell = _expressed_per_cell(adata, layer, pre.match.vocab_ids >= 0)
    return preflight_report(pre, expressed_per_cell)


@dataclass
class Preflight:
    """What the preflight read of an AnnData, kept so that preparing it reads nothing twice.

    Attributes
    ----------
    checkpoint
        The resolved checkpoint.
    match
        The model's gene match of the AnnData.
    labels
        The encoded label column (every class, however few), or ``None`` without ``label_key``.
    batches
        The batch column as strings, or ``None`` without ``batch_key``.
    value_kind
        What the values look like (``describe_values``).
    n_cells
        Cells in the AnnData.
    has_raw
        Whether the AnnData has ``.raw`` (where scaled data's own values often are).
    label_key, gene_key, layer, batch_key, min_gene_overlap
        What was asked.
    """

    checkpoint: ModelCheckpoint
    match: Any
    labels: EncodedLabels | None
    batches: np.ndarray | None
    value_kind: str
    n_cells: int
    has_raw: bool
    label_key: str | None
    gene_key: str | None
    layer: str | None
    batch_key: str | None
    min_gene_overlap: int | float


def preflight_data(
    adata: Any,
    *,
    label_key: str | None,
    checkpoint: str | os.PathLike | ModelCheckpoint,
    gene_key: str | None = None,
    layer: str | None = None,
    min_gene_overlap: int | float = MIN_GENE_OVERLAP,
    batch_key: str | None = None,
) -> Preflight:
    """Read what the preflight checks: labels, batches, the kind of values and the gene match.

    Only the value check passes over the matrix; the rest reads ``obs``, ``var`` and the
    checkpoint's gene files. Raises ``KeyError`` for a missing ``label_key``, ``batch_key``,
    ``gene_key`` or ``layer``, and ``ValueError`` for cells without a batch.
    """
    ckpt = resolve_model_checkpoint(checkpoint)
    labels = (
        encode_labels(read_label_column(adata.obs, label_key), min_classes=0)
        if label_key is not None
        else None
    )
    batches = read_batch_column(adata.obs, batch_key) if batch_key is not None else None
    value_kind = describe_values(adata, layer)  # raises KeyError for a missing layer
    return Preflight(
        checkpoint=ckpt,
        match=model_card(ckpt).match_genes(adata, ckpt, gene_key),
        labels=labels,
        batches=batches,
        value_kind=value_kind,
        n_cells=int(adata.n_obs),
        has_raw=adata.raw is not None,
        label_key=label_key,
        gene_key=gene_key,
        layer=layer,
        batch_key=batch_key,
        min_gene_overlap=min_gene_overlap,
    )


def preflight_report(
    pre: Preflight, expressed_per_cell: np.ndarray | None
) -> ScGPTAnnotationDataReport:
    """The report of a :class:`Preflight`, given the matched genes each cell expresses (the
    tokens count them; ``None`` only when the values are unreadable: NaN, infinite or empty)."""
    ckpt, match, card = pre.checkpoint, pre.match, model_card(pre.checkpoint)
    gene_key, layer, label_key, value_kind = pre.gene_key, pre.layer, pre.label_key, pre.value_kind
    min_gene_overlap = pre.min_gene_overlap
    problems: list[str] = []
    warnings: list[str] = []
    needed = (
        min_gene_overlap * match.names.size
        if isinstance(min_gene_overlap, float) and min_gene_overlap < 1
        else min_gene_overlap
    )
    if gene_key is None and looks_like_ensembl(match.names) and match.ratio < 0.5:
        problems.append(
            f"var_names look like Ensembl ids but few of them are in the {card.title} "
            "vocabulary: check the species and id version, or pass gene_key= naming the adata.var "
            "column with the identifiers the model reads (e.g. symbols: 'feature_name', "
            "'gene_symbols')."
        )
    elif match.n_matched < max(needed, 1):
        problems.append(
            f"only {match.n_matched} genes are in the vocabulary (need {needed:g}): use human gene "
            "symbols, or pass gene_key= naming the adata.var column that holds them."
        )
    elif match.ratio < LOW_OVERLAP:
        warnings.append(
            f"only {match.ratio:.0%} of the genes are in the vocabulary; {card.title} ignores the "
            "rest. "
            "Check the gene identifiers (symbols expected) or gene_key."
        )

    if value_kind == "scaled_negative":
        fix = "`adata.raw.to_adata()`" if layer is None and pre.has_raw else "raw counts"
        problems.append(
            f"values are negative (scaled data); {card.title} needs {card.input_note}: "
            f"use {fix} or pass layer= naming a counts layer."
        )
    elif value_kind not in (*card.value_kinds, "non_finite", "empty"):
        problems.append(
            f"values look {value_kind.replace('_', '-')}; {card.title} needs {card.input_note}: "
            "pass layer= naming a raw-counts layer."
        )
    elif value_kind == "non_finite":
        problems.append(
            "values contain NaN or infinity: clean them or pass layer= naming a clean layer."
        )
    elif value_kind == "empty":
        problems.append("the expression matrix has no non-zero values.")

    if value_kind in {"non_finite", "empty"}:
        expressed = np.zeros(pre.n_cells, np.int64)
    elif expressed_per_cell is None:
        msg = "preflight_report needs each cell's matched-gene count for readable values."
        raise ValueError(msg)
    else:
        expressed = np.asarray(expressed_per_cell)
    max_len = ckpt.max_seq_len
    over = int((expressed + ckpt.n_special_tokens > max_len).sum())
    if over:
        warnings.append(
            f"{over} cells express more than {max_len - ckpt.n_special_tokens} matched genes; "
            f"{card.truncation_note}."
        )
    if expressed.size and (expressed == 0).any():
        warnings.append(
            f"{int((expressed == 0).sum())} cells express none of the matched genes; the model "
            "sees no gene of theirs. Consider filtering them (sc.pp.filter_cells)."
        )

    categories: list[str] = []
    counts: list[int] = []
    n_unlabelled = 0
    stratifiable = False
    if pre.labels is not None:
        categories = pre.labels.categories
        counts = list(pre.labels.counts().values())
        n_unlabelled = int((~pre.labels.labelled).sum())
        if len(categories) < 2:
            problems.append(
                f"{label_key!r} has {len(categories)} labelled class(es); at least 2 are "
                "needed. Check label_key or label more cells."
            )
        small = [c for c, n in zip(categories, counts, strict=True) if n < MIN_CELLS_TO_STRATIFY]
        stratifiable = len(categories) >= 2 and not small
        if small:
            warnings.append(
                f"classes with fewer than {MIN_CELLS_TO_STRATIFY} cells cannot be stratified "
                f"into train/val/test and will be used for training only: {', '.join(small)}."
            )
        if n_unlabelled:
            warnings.append(
                f"{n_unlabelled} cells have no label; they are left out of training and "
                "evaluation and still get predictions."
            )
    batch_fields = (
        _batch_summary(pre.batches, pre.labels, warnings) if pre.batches is not None else {}
    )
    return ScGPTAnnotationDataReport(
        checkpoint=ckpt.name,
        n_cells=pre.n_cells,
        n_genes_input=int(match.names.size),
        n_genes_matched=match.n_matched,
        gene_match_ratio=float(match.ratio),
        n_genes_unmatched=len(match.unmatched),
        unmatched_genes_sample=match.unmatched[:UNMATCHED_SAMPLE],
        gene_key=gene_key or "",
        layer=layer or "",
        value_kind=value_kind,
        expressed_genes_median=float(np.median(expressed)) if expressed.size else 0.0,
        expressed_genes_max=int(expressed.max()) if expressed.size else 0,
        max_seq_len=max_len,
        n_cells_over_max_seq_len=over,
        label_key=label_key or "",
        label_categories=categories,
        label_counts=counts,
        n_unlabelled=n_unlabelled,
        stratified_split_possible=stratifiable,
        batch_key=pre.batch_key or "",
        **batch_fields,
        problems=problems,
        warnings=warnings,
    )


def _batch_summary(
    batches: np.ndarray, encoded: EncodedLabels | None, warnings: list[str]
) -> dict[str, Any]:
    names = sorted(set(batches))
    out: dict[str, Any] = {
        "batch_names": names,
        "batch_cell_counts": [int((batches == b).sum()) for b in names],
        "batch_class_counts": [0] * len(names),
        "classes_in_one_batch": [],
    }
    if encoded is None or not encoded.categories:
        return out
    categories = encoded.categories
    present = {b: set(encoded.codes[(batches == b) & encoded.labelled].tolist()) for b in names}
    out["batch_class_counts"] = [len(present[b]) for b in names]
    lonely = [c for code, c in enumerate(categories) if sum(code in present[b] for b in names) == 1]
    out["classes_in_one_batch"] = lonely
    if lonely and len(names) > 1:
        warnings.append(
            f"classes present in only one batch: {', '.join(lonely)}. With split_by='batch', "
            "a held-out batch may contain classes never seen in training (or training may miss "
            "them); read per-batch metrics with that in mind."
        )
    return out
