"""The TaskRunner's input features: standardised log-expression, gene by gene.

:func:`read_expression` validates and log-normalises an AnnData, :func:`gene_statistics` gives
the per-gene mean and scale of the training split, :func:`align_genes` puts a query's genes in
the model's order, and :class:`ExpressionDataset` standardises cells batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch.utils.data import Dataset

from scdlkit._shared.validation import gene_names, validate_values
from scdlkit.baselines._expression import log_normalised_matrix

__all__ = [
    "MAX_VALUE",
    "ExpressionDataset",
    "align_genes",
    "check_unique_genes",
    "gene_statistics",
    "read_expression",
]

logger = logging.getLogger("scdlkit")

#: Standardised values are clipped to +-MAX_VALUE (as ``sc.pp.scale(max_value=10)``).
MAX_VALUE = 10.0


def check_unique_genes(genes: pd.Index, where: str) -> None:
    """A ValueError when ``genes`` repeat a name (genes are matched by name)."""
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:5].tolist()
        msg = (
            f"{where} has duplicate gene names ({', '.join(map(str, dup))}, ...); genes are "
            "matched by name, so make them unique first: adata.var_names_make_unique()."
        )
        raise ValueError(msg)


def read_expression(
    adata: Any, layer: str | None, gene_key: str | None
) -> tuple[sparse.csr_matrix, pd.Index]:
    """Validated, log-normalised cells x genes matrix and the gene names."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"adata has shape {adata.shape}; it needs at least one cell and one gene."
        raise ValueError(msg)
    genes = gene_names(adata, gene_key)
    check_unique_genes(genes, "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]")
    validate_values(adata, layer)
    return log_normalised_matrix(adata, layer), genes


def gene_statistics(matrix: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (1 where a gene is constant), summed in float64."""
    m = sparse.csr_matrix(matrix, dtype=np.float64)
    n = max(m.shape[0], 1)
    mean = np.asarray(m.sum(axis=0)).ravel() / n
    square = np.asarray(m.multiply(m).sum(axis=0)).ravel() / n
    std = np.sqrt(np.maximum(square - mean**2, 0.0))
    scale = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


def align_genes(
    matrix: sparse.csr_matrix, genes: pd.Index, model_genes: Sequence[str]
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """``matrix`` with its columns in the order of ``model_genes``, and which of them are missing.

    Missing genes are empty columns (a warning says how many); a query that shares no gene with
    the model is an error.
    """
    position = genes.get_indexer(model_genes)
    present = position >= 0
    if not present.any():
        msg = (
            f"none of the {len(model_genes)} genes the model was trained on is in adata "
            f"(e.g. {', '.join(model_genes[:3])}); check var_names or gene_key=."
        )
        raise ValueError(msg)
    if not present.all():
        logger.warning(
            "%d of %d model genes are missing from adata; they are set to the training mean.",
            int((~present).sum()),
            len(model_genes),
        )
    cols = np.flatnonzero(present)
    selector = sparse.csr_matrix(
        (np.ones(len(cols), np.float32), (position[cols], cols)),
        shape=(matrix.shape[1], len(model_genes)),
    )
    return sparse.csr_matrix(matrix @ selector, dtype=np.float32), ~present


class ExpressionDataset(Dataset):
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
        """Standardised, clipped float32 features of the cells at ``positions``."""
        rows = self.matrix[np.asarray(positions, dtype=np.int64)].toarray()
        x = (rows - self.mean) / self.scale
        if self.missing is not None:
            x[:, self.missing] = 0.0
        return np.clip(x, -MAX_VALUE, MAX_VALUE, out=x).astype(np.float32, copy=False)

    def collate_fn(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """``{"x": features, "labels": codes}`` tensors for the cells at ``positions``."""
        idx = np.asarray(positions, dtype=np.int64)
        return {
            "x": torch.from_numpy(self.features(idx)),
            "labels": torch.from_numpy(self.labels[idx]),
        }
