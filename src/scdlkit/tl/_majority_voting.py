"""Majority voting of predicted labels over (over-)clusters, as CellTypist does.

Each cluster takes the label most of its cells were given; a cluster whose majority share is
under ``min_prop`` is called ``"Heterogeneous"``. Without a given clustering the cells are
over-clustered on their **expression**, independently of the model that labelled them
(CellTypist's ``_construct_neighbor_graph``): log-normalised values, genes expressed in at least
5 cells, the 2,500 most variable genes, scaled (clipped at 10), 50 principal components, a graph
of 10 neighbours, then scanpy's Leiden (igraph flavour, 2 iterations) at CellTypist's resolution
for the number of cells. Without ``igraph`` the principal components are split by k-means
instead, with a ``UserWarning``. With 50 cells or fewer there is no over-clustering and no vote
(CellTypist's rule).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "HETEROGENEOUS",
    "MIN_CELLS_TO_VOTE",
    "expression_representation",
    "majority_vote",
    "over_cluster",
    "over_clustering_resolution",
    "resolve_over_clustering",
]

HETEROGENEOUS = "Heterogeneous"

#: With this many cells or fewer, no over-clustering and no vote (CellTypist's ``annotate``).
MIN_CELLS_TO_VOTE = 50

#: Leiden resolution by number of cells, CellTypist's steps (``Classifier.over_cluster``):
#: up to 5,000 cells 5, then 10, 15, 20, 25 and 30 above 200,000.
_RESOLUTION_STEPS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))
#: CellTypist's expression graph: genes in >= 5 cells, 2,500 HVGs, scaled to 10, 50 PCs, 10 NNs.
_MIN_CELLS_PER_GENE = 5
_N_TOP_GENES = 2_500
_SCALE_MAX = 10.0
_N_PCS = 50
_N_NEIGHBORS = 10
#: k-means (without igraph) gets ``7 x resolution`` clusters, at most one per 10 cells: about
#: the number and size of Leiden's clusters at resolution 5 on 100 to 1,000 PBMCs (28 to 35).
_KMEANS_PER_RESOLUTION = 7
_MIN_CELLS_PER_CLUSTER = 10

#: What ``uns[key]["majority_voting"]["representation"]`` says of the computed clusters.
EXPRESSION_GRAPH = (
    "expression: log-normalised, genes in >= 5 cells, 2,500 most variable, scaled (max 10), "
    "50 PCs, 10 neighbours"
)


def over_clustering_resolution(n_cells: int) -> float:
    """The Leiden resolution CellTypist uses for ``n_cells`` cells."""
    for limit, resolution in _RESOLUTION_STEPS:
        if n_cells < limit:
            return resolution
    return 30.0


def expression_representation(
    adata: Any, layer: str | None = None, *, random_state: int = 0
) -> np.ndarray:
    """CellTypist's principal components of the cells' expression (cells x <= 50, float32).

    Counts are log-normalised first (values that are already log-normalised are used as they
    are), as :func:`scdlkit.baselines.log_normalised_matrix` does; a backed AnnData is read in
    chunks. Memory: one dense cells x (at most 2,500 genes) float32 matrix while scaling.
    """
    # scanpy and the baseline's reader are imported here: only a vote without clusters needs them
    import anndata as ad
    import scanpy as sc

    from scdlkit.baselines import log_normalised_matrix

    matrix = log_normalised_matrix(adata, layer)
    expressed = np.asarray((matrix > 0).sum(axis=0)).ravel() >= _MIN_CELLS_PER_GENE
    if expressed.sum() >= 2:
        matrix = matrix[:, np.flatnonzero(expressed)]
    holder = ad.AnnData(matrix)
    if holder.n_vars > _N_TOP_GENES:
        sc.pp.highly_variable_genes(holder, n_top_genes=_N_TOP_GENES)
        holder = holder[:, holder.var["highly_variable"].to_numpy()].copy()
    holder.X = np.asarray(holder.X.toarray(), dtype=np.float32)
    sc.pp.scale(holder, max_value=_SCALE_MAX)
    n_comps = int(min(_N_PCS, holder.n_obs - 1, holder.n_vars - 1))
    if n_comps < 1:
        return np.asarray(holder.X, dtype=np.float32)
    sc.pp.pca(holder, n_comps=n_comps, random_state=random_state)
    return np.asarray(holder.obsm["X_pca"], dtype=np.float32)


def over_cluster(representation: np.ndarray, *, random_state: int = 0) -> tuple[np.ndarray, dict]:
    """Over-cluster cells on ``representation`` (cells x dims, e.g. the expression PCs).

    Leiden on a graph of 10 neighbours when ``igraph`` is installed; else k-means, with a
    ``UserWarning`` that names the fallback.

    Returns
    -------
    ``(clusters, info)``: cluster names (str) per cell, and how they were computed (``method``,
    ``resolution``, ``n_clusters``), for ``uns``.
    """
    rep = np.asarray(representation, dtype=np.float32)
    n_cells = rep.shape[0]
    resolution = over_clustering_resolution(n_cells)
    if n_cells < 2:
        return np.zeros(n_cells, dtype=int).astype(str), {"method": "single", "n_clusters": 1}
    if find_spec("igraph") is not None:
        clusters = _leiden(rep, resolution, random_state)
        method = "leiden"
    else:
        k = int(min(_KMEANS_PER_RESOLUTION * resolution, max(1, n_cells // _MIN_CELLS_PER_CLUSTER)))
        message = (
            f"igraph is not installed, so the over-clustering for majority voting is k-means "
            f"({k} clusters) instead of CellTypist's Leiden (resolution {resolution:g}); "
            "uns[key]['majority_voting']['method'] records 'kmeans'. For Leiden: "
            "pip install 'scdlkit[leiden]' (or igraph); or pass over_clustering= (an obs "
            "column such as sc.tl.leiden's)."
        )
        warnings.warn(message, UserWarning, stacklevel=4)  # the caller of tl.annotate
        clusters = _kmeans(rep, k, random_state)
        method = "kmeans"
    n_clusters = len(np.unique(clusters))
    info = {"method": method, "resolution": resolution, "n_clusters": n_clusters}
    return clusters.astype(str), info


def _leiden(rep: np.ndarray, resolution: float, random_state: int) -> np.ndarray:
    # scanpy is imported here: only majority voting without a given clustering needs it
    import anndata as ad
    import scanpy as sc

    holder = ad.AnnData(np.zeros((rep.shape[0], 0), dtype=np.float32))
    holder.obsm["X_rep"] = rep
    n_neighbors = int(min(_N_NEIGHBORS, rep.shape[0] - 1))
    sc.pp.neighbors(holder, n_neighbors=n_neighbors, use_rep="X_rep", random_state=random_state)
    sc.tl.leiden(
        holder,
        resolution=resolution,
        flavor="igraph",
        n_iterations=2,
        directed=False,
        random_state=random_state,
    )
    return holder.obs["leiden"].to_numpy()


def _kmeans(rep: np.ndarray, k: int, random_state: int) -> np.ndarray:
    # scikit-learn is imported where used: most calls never vote
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if k <= 1:
        return np.zeros(rep.shape[0], dtype=int)
    if rep.shape[0] > 20_000:
        model = MiniBatchKMeans(n_clusters=k, random_state=random_state, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=k, random_state=random_state, n_init=3)
    return model.fit_predict(rep)


def resolve_over_clustering(adata: Any, over_clustering: str | Sequence[Any] | None) -> Any:
    """Check a given clustering before any work: an ``obs`` column or one value per cell."""
    if over_clustering is None:
        return None
    if isinstance(over_clustering, Mapping) or not (
        isinstance(over_clustering, str) or hasattr(over_clustering, "__len__")
    ):
        msg = (
            "over_clustering must be an adata.obs column name, one cluster per cell (a list, "
            f"array or Series) or None, got {type(over_clustering).__name__}."
        )
        raise TypeError(msg)
    if isinstance(over_clustering, str):
        if over_clustering not in adata.obs.columns:
            msg = (
                f"over_clustering={over_clustering!r} is not a column of adata.obs; give an obs "
                "column, one cluster per cell, or None to over-cluster on the annotation."
            )
            raise KeyError(msg)
        values = adata.obs[over_clustering].to_numpy()
    else:
        values = np.asarray(over_clustering, dtype=object).ravel()
        if len(values) != adata.n_obs:
            msg = (
                f"over_clustering has {len(values)} values for {adata.n_obs} cells; give one "
                "cluster per cell, an adata.obs column name, or None."
            )
            raise ValueError(msg)
    if pd.isna(pd.Series(values)).any():
        msg = "over_clustering has missing values; give every cell a cluster."
        raise ValueError(msg)
    return np.asarray([str(v) for v in values], dtype=object)


def majority_vote(
    labels: np.ndarray, clusters: np.ndarray, *, min_prop: float = 0.0
) -> tuple[np.ndarray, pd.DataFrame]:
    """The majority label of each cell's cluster.

    Parameters
    ----------
    labels
        Predicted label per cell.
    clusters
        Cluster per cell.
    min_prop
        A cluster whose most frequent label holds a smaller share of its cells is labelled
        :data:`HETEROGENEOUS`. Ties go to the label first in sorted order.

    Returns
    -------
    The voted label per cell, and one row per cluster (``cluster``, ``label``, ``share``,
    ``n_cells``).
    """
    table = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(labels, name="label"))
    table = table.reindex(sorted(table.columns), axis=1)
    counts = table.to_numpy()
    top = counts.argmax(axis=1)
    n_cells = counts.sum(axis=1)
    share = counts[np.arange(len(top)), top] / np.maximum(n_cells, 1)
    winner = np.asarray(table.columns, dtype=object)[top]
    winner = np.where(share < min_prop, HETEROGENEOUS, winner)
    summary = pd.DataFrame(
        {
            "cluster": table.index.astype(str),
            "label": winner.astype(str),
            "share": share.astype(float),
            "n_cells": n_cells.astype(np.int64),
        }
    )
    by_cluster = dict(zip(table.index, winner, strict=True))
    return np.asarray([by_cluster[c] for c in clusters], dtype=object), summary
