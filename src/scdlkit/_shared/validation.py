"""Checks on the user's AnnData before any work: expression values and gene identifiers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "MIN_SHARED_GENES",
    "cells_without_expression",
    "check_shared_genes",
    "describe_values",
    "gene_names",
    "get_matrix",
    "iter_row_chunks",
    "looks_like_ensembl",
    "validate_values",
]

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
CHUNK_CELLS = 4096
#: Genes a query must share with what a model reads (the scGPT vocabulary, or the baseline's
#: fitted genes): fewer and its labels say more about the genes missing than about the cells.
MIN_SHARED_GENES = 100


def get_matrix(adata: Any, layer: str | None) -> Any:
    """The expression matrix the user pointed at: ``adata.layers[layer]`` or ``adata.X``."""
    if layer is None:
        if adata.X is None:
            msg = "adata.X is empty: pass layer= naming a layer with counts or log-normalised data."
            raise ValueError(msg)
        return adata.X
    if layer not in adata.layers:
        available = ", ".join(map(repr, adata.layers.keys())) or "none"
        msg = f"layer={layer!r} is not in adata.layers (available: {available})."
        raise KeyError(msg)
    return adata.layers[layer]


def iter_row_chunks(
    matrix: Any, chunk: int = CHUNK_CELLS
) -> Iterator[tuple[int, sparse.csr_matrix]]:
    """Yield ``(start, rows as CSR float32)``; works for dense, sparse, backed and dask matrices."""
    n = matrix.shape[0]
    for start in range(0, n, chunk):
        block = matrix[start : min(start + chunk, n)]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
        if hasattr(block, "to_memory"):  # anndata backed sparse dataset
            block = block.to_memory()
        block = sparse.csr_matrix(block, dtype=np.float32) if not sparse.issparse(block) else block
        yield start, sparse.csr_matrix(block, dtype=np.float32)


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _stored_values(matrix: Any, size: int = 1 << 20) -> Iterator[np.ndarray]:
    """The matrix's stored values in blocks of ``size``; sparse ones (backed or not) without
    reading their indices, so the scan's memory stays a few MiB whatever the data."""
    group = getattr(matrix, "group", None)  # anndata's backed sparse dataset
    stored = group["data"] if group is not None and "data" in group else None
    if stored is None and sparse.issparse(matrix):
        stored = matrix.data
    if stored is not None:
        for start in range(0, stored.shape[0], size):
            yield np.asarray(stored[start : start + size])
        return
    for _, block in iter_row_chunks(matrix):
        yield block.data


def validate_values(adata: Any, layer: str | None) -> None:
    """Refuse negative or non-finite expression values with a pointer to usable data.

    scGPT bins each cell's non-zero values by rank, so raw counts and log-normalised values work
    alike; scaled (z-scored) data have negative values and lose the zero/non-zero distinction.
    """
    for data in _stored_values(get_matrix(adata, layer)):
        if not np.isfinite(data).all():
            msg = (
                f"{_where(layer)} holds NaN or infinite values. scGPT needs raw counts or "
                "log-normalised expression: fill or drop those cells, or pass layer= naming a "
                "clean layer."
            )
            raise ValueError(msg)
        if (data < 0).any():
            hints = []
            if layer is None and getattr(adata, "raw", None) is not None:
                hints.append("`adata.raw.to_adata()` (this object has a .raw)")
            if len(adata.layers):
                hints.append(f"layer= one of {', '.join(map(repr, adata.layers.keys()))}")
            hint = " or ".join(hints) if hints else "raw counts or log-normalised values"
            msg = (
                f"{_where(layer)} has negative values, so it looks scaled (e.g. sc.pp.scale). "
                f"scGPT needs raw counts or log-normalised expression: use {hint}."
            )
            raise ValueError(msg)


def describe_values(adata: Any, layer: str | None, *, max_cells: int = 2000) -> str:
    """What the values look like: raw_counts, log_normalised, scaled_negative, non_finite, empty.

    Looks at up to ``max_cells`` cells spread over the data.
    """
    matrix = get_matrix(adata, layer)
    n = matrix.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, max_cells)).astype(int)) if n else []
    block = matrix[rows] if len(rows) else None
    if block is None:
        return "empty"
    if hasattr(block, "compute"):
        block = block.compute()
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    data = block.data if sparse.issparse(block) else np.asarray(block).ravel()
    data = data[data != 0]
    if data.size == 0:
        return "empty"
    if not np.isfinite(data).all():
        return "non_finite"
    if (data < 0).any():
        return "scaled_negative"
    if np.allclose(data, np.round(data)):
        return "raw_counts"
    return "log_normalised"


def gene_names(adata: Any, gene_key: str | None) -> pd.Index:
    """Gene symbols to match against the vocabulary: ``var[gene_key]`` or ``var_names``."""
    if gene_key is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_key not in adata.var.columns:
        msg = (
            f"gene_key={gene_key!r} is not a column of adata.var (columns: "
            f"{', '.join(map(repr, adata.var.columns)) or 'none'})."
        )
        raise KeyError(msg)
    return pd.Index(adata.var[gene_key].astype(str))


def looks_like_ensembl(names: pd.Index, threshold: float = 0.5) -> bool:
    """True when most names are Ensembl gene ids (ENSG..., ENSMUSG...)."""
    if len(names) == 0:
        return False
    sample = names[: min(len(names), 2000)]
    hits = sum(bool(_ENSEMBL.match(n)) for n in sample)
    return hits / len(sample) >= threshold


def check_shared_genes(
    names: pd.Index,
    known: Any,
    *,
    gene_key: str | None,
    what: str,
    min_shared: int = MIN_SHARED_GENES,
    capacity: int | None = None,
) -> np.ndarray:
    """Positions of ``names`` that are in ``known``; refuse a query sharing too few genes.

    At least ``min(min_shared, len(known))`` genes must be shared, so a query with a handful of
    the model's genes is refused as one with none of them is, never labelled in silence.

    Parameters
    ----------
    names
        The query's gene names.
    known
        The genes the model reads (anything supporting ``in``; a sized collection).
    gene_key
        Where ``names`` came from, for the message.
    what
        What ``known`` is, for the message (e.g. "the baseline's fitted genes").
    min_shared
        Genes needed, capped at ``capacity``.
    capacity
        How many genes the model could read at most (default ``len(known)``): when ``known``
        holds only the query's own matches, the cap must come from the model.
    """
    present = np.fromiter((n in known for n in names), dtype=bool, count=len(names))
    needed = min(min_shared, len(known) if capacity is None else capacity)
    shared = int(present.sum())
    if shared == 0 or shared < needed:
        where = f"adata.var[{gene_key!r}]" if gene_key else "adata.var_names"
        sample = ", ".join(map(str, names[:5])) or "none"
        msg = (
            f"only {shared} of {len(names)} genes in {where} are among {what} (need at least "
            f"{needed}; first genes: {sample}). Use the same kind of gene identifiers as the "
            "reference (e.g. symbols), or pass gene_key= naming the adata.var column that holds "
            "them."
        )
        raise ValueError(msg)
    return np.flatnonzero(present)


def cells_without_expression(matrix: Any, columns: np.ndarray | None = None) -> np.ndarray:
    """True for each cell with no non-zero value (among ``columns`` when given).

    Such a cell carries nothing a model can read: any label for it would come from the model's
    prior alone. Reads the matrix in row chunks (dense, sparse, backed or dask).
    """
    empty = np.zeros(matrix.shape[0], dtype=bool)
    for start, block in iter_row_chunks(matrix):
        if columns is not None:
            block = block[:, columns]
        block = sparse.csr_matrix(block)
        block.eliminate_zeros()
        empty[start : start + block.shape[0]] = np.diff(block.indptr) == 0
    return empty
