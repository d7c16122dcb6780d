"""Majority voting of predicted labels over (over-)clusters, as CellTypist does.

Each cluster takes the label most of its cells were given; a cluster whose majority share is
under ``min_prop`` is called ``"Heterogeneous"``. Without a given clustering, the cells are
over-clustered on the annotation representation: scanpy's Leiden (igraph flavour) when
``python-igraph`` is installed, k-means otherwise, with more clusters for more cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "HETEROGENEOUS",
    "majority_vote",
    "over_cluster",
    "over_clustering_resolution",
    "resolve_over_clustering",
]

logger = logging.getLogger("scdlkit")

HETEROGENEOUS = "Heterogeneous"

#: Leiden resolution by number of cells, CellTypist's steps (``celltypist.annotate``):
#: up to 5,000 cells 5, then 10, 15, 20, 25 and 30 above 200,000.
_RESOLUTION_STEPS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))
#: k-means (without igraph) gets ``10 x resolution`` clusters, at most one per 5 cells.
_KMEANS_PER_RESOLUTION = 10
_MIN_CELLS_PER_CLUSTER = 5


def over_clustering_resolution(n_cells: int) -> float:
    """The Leiden resolution CellTypist uses for ``n_cells`` cells."""
    for limit, resolution in _RESOLUTION_STEPS:
        if n_cells < limit:
            return resolution
    return 30.0


def over_cluster(representation: np.ndarray, *, random_state: int = 0) -> tuple[np.ndarray, dict]:
    """Over-cluster cells on ``representation`` (cells x dims).

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
        clusters = _kmeans(rep, k, random_state)
        method = "kmeans"
        logger.info("python-igraph not installed: over-clustering with k-means (k=%d)", k)
    n_clusters = len(np.unique(clusters))
    info = {"method": method, "resolution": resolution, "n_clusters": n_clusters}
    return clusters.astype(str), info


def _leiden(rep: np.ndarray, resolution: float, random_state: int) -> np.ndarray:
    # scanpy is imported here: only majority voting without a given clustering needs it
    import anndata as ad
    import scanpy as sc

    holder = ad.AnnData(np.zeros((rep.shape[0], 0), dtype=np.float32))
    holder.obsm["X_rep"] = rep
    sc.pp.neighbors(holder, use_rep="X_rep", random_state=random_state)
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
