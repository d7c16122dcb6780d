"""Labels chosen at annotation time: threshold, probability matrix, majority voting slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.slots import h5ad_safe
from scdlkit.tl._majority_voting import HETEROGENEOUS

__all__ = [
    "UNKNOWN_LABEL",
    "Vote",
    "check_labelling_options",
    "label_cells",
    "probability_columns",
    "write_labelling_slots",
]

UNKNOWN_LABEL = "Unknown"


@dataclass
class Vote:
    """A majority vote: whether the clusters were computed here, the cluster and voted label of
    each cell, one row per cluster, and how the clusters were made."""

    computed: bool
    clusters: np.ndarray
    labels: np.ndarray
    summary: pd.DataFrame
    how: dict[str, Any]


def check_labelling_options(
    confidence_threshold: float | None, unknown_label: str, min_prop: float
) -> None:
    """Refuse bad labelling options before any work."""
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        msg = f"confidence_threshold={confidence_threshold} must be in [0, 1] or None."
        raise ValueError(msg)
    if not isinstance(unknown_label, str) or not unknown_label:
        msg = f"unknown_label={unknown_label!r} must be a non-empty string."
        raise ValueError(msg)
    if not 0 <= min_prop <= 1:
        msg = f"min_prop={min_prop} must be in [0, 1]."
        raise ValueError(msg)


def label_cells(
    probabilities: np.ndarray,
    categories: Sequence[str],
    threshold: float | None,
    unknown_label: str,
) -> tuple[np.ndarray, list[str]]:
    """The most probable class of each cell, ``unknown_label`` under ``threshold``.

    Returns the labels and the categories of the ``obs`` column (``unknown_label`` last when a
    threshold is set).
    """
    categories = [str(c) for c in categories]
    if threshold is not None and unknown_label in categories:
        msg = (
            f"unknown_label={unknown_label!r} is one of the runner's classes; choose another name "
            "for the cells under the confidence threshold."
        )
        raise ValueError(msg)
    labels = np.asarray(categories, dtype=object)[probabilities.argmax(axis=1)]
    if threshold is None:
        return labels, categories
    labels = np.where(probabilities.max(axis=1) < threshold, unknown_label, labels)
    return labels.astype(object), [*categories, unknown_label]


def probability_columns(categories: Sequence[str]) -> list[str]:
    """Column names of the probability DataFrame: the categories, with ``/`` as ``_``.

    zarr (and h5ad from the next anndata release) refuse ``/`` in the names of a DataFrame's
    columns; ``uns[key]["label_categories"]`` keeps the names as they are, in the same order.
    """
    columns: list[str] = []
    for name in categories:
        column = str(name).replace("/", "_")
        while column in columns:
            column = f"{column}_"
        columns.append(column)
    return columns


def write_labelling_slots(
    adata: AnnData,
    key: str,
    labels: np.ndarray,
    categories: list[str],
    probabilities: np.ndarray | None,
    vote: Vote | None,
) -> None:
    """``obs[key]`` with these labels; the probability DataFrame and the vote, or neither.

    Slots of an earlier call that this one does not write are removed, so the AnnData never
    mixes two annotations.
    """
    adata.obs[key] = pd.Categorical(labels, categories=categories)
    prob_key = f"{key}_probabilities"
    if probabilities is not None:
        n_classes = probabilities.shape[1]
        adata.obsm[prob_key] = pd.DataFrame(
            np.asarray(probabilities, dtype=np.float32),
            index=adata.obs_names.copy(),
            columns=probability_columns(categories[:n_classes]),
        )
    else:
        adata.obsm.pop(prob_key, None)
    vote_key, cluster_key = f"{key}_majority_voting", f"{key}_over_clustering"
    if vote is None:
        _drop_columns(adata, vote_key, cluster_key)
        adata.uns[key].pop("majority_voting", None)
        return
    vote_categories = list(categories)
    if (vote.labels == HETEROGENEOUS).any():
        vote_categories.append(HETEROGENEOUS)
    adata.obs[vote_key] = pd.Categorical(vote.labels, categories=vote_categories)
    if vote.computed:
        order = sorted(set(vote.clusters), key=lambda c: (len(c), c))  # "2" before "10"
        adata.obs[cluster_key] = pd.Categorical(vote.clusters, categories=order)
    else:
        _drop_columns(adata, cluster_key)
    adata.uns[key]["majority_voting"] = {"clusters": vote.summary, **h5ad_safe(vote.how)}


def _drop_columns(adata: AnnData, *columns: str) -> None:
    present = [c for c in columns if c in adata.obs.columns]
    if present:
        adata.obs = adata.obs.drop(columns=present)
