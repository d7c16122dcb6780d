"""Labels chosen at annotation time: threshold, probability matrix, majority voting slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.arguments import check_bool, check_number, check_optional_number
from scdlkit._shared.labels import UNKNOWN_LABEL
from scdlkit._shared.slots import Slots, h5ad_safe
from scdlkit.pl._probabilities import probability_columns
from scdlkit.tl._checks import check_str
from scdlkit.tl._majority_voting import HETEROGENEOUS

__all__ = [
    "UNKNOWN_LABEL",
    "LabellingOptions",
    "Vote",
    "check_labelling_options",
    "conformal_slots",
    "check_unknown_label",
    "label_cells",
    "labelling_slots",
    "probability_columns",
    "set_labels",
]


@dataclass
class Vote:
    """A majority vote: whether the clusters were computed here, the cluster and voted label of
    each cell, one row per cluster, and how the clusters were made."""

    computed: bool
    clusters: np.ndarray
    labels: np.ndarray
    summary: pd.DataFrame
    how: dict[str, Any]


@dataclass(frozen=True)
class LabellingOptions:
    """The labelling arguments of :func:`scdlkit.tl.annotate`, checked and in Python types."""

    confidence_threshold: float | None
    unknown_label: str
    majority_voting: bool
    min_prop: float
    probabilities: bool


def check_labelling_options(
    confidence_threshold: Any,
    unknown_label: Any,
    min_prop: Any,
    *,
    majority_voting: Any = False,
    probabilities: Any = True,
) -> LabellingOptions:
    """Refuse bad labelling options before any work; return them checked."""
    return LabellingOptions(
        confidence_threshold=check_optional_number(
            "confidence_threshold", confidence_threshold, min_value=0.0, max_value=1.0
        ),
        unknown_label=check_str("unknown_label", unknown_label),
        majority_voting=check_bool("majority_voting", majority_voting),
        min_prop=check_number("min_prop", min_prop, min_value=0.0, max_value=1.0),
        probabilities=check_bool("probabilities", probabilities),
    )


def check_unknown_label(
    categories: Sequence[Any], threshold: float | None, unknown_label: str
) -> None:
    """Refuse an ``unknown_label`` that is one of the classes (only matters with a threshold)."""
    if threshold is not None and unknown_label in {str(c) for c in categories}:
        msg = (
            f"unknown_label={unknown_label!r} is one of the runner's classes; choose another name "
            "for the cells under the confidence threshold."
        )
        raise ValueError(msg)


def label_cells(
    probabilities: np.ndarray,
    categories: Sequence[str],
    threshold: float | None,
    unknown_label: str,
    *,
    no_expression: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The most probable class of each cell, ``unknown_label`` under ``threshold``.

    Cells marked in ``no_expression`` (no expressed gene the model reads, as the runner's
    ``predict`` reports them) get ``unknown_label`` too. Returns the labels and the categories
    of the ``obs`` column (``unknown_label`` last when a threshold is set or a cell has it).
    """
    categories = [str(c) for c in categories]
    unsure = np.zeros(probabilities.shape[0], dtype=bool)
    if threshold is not None:
        unsure |= probabilities.max(axis=1) < threshold
    if no_expression is not None:
        unsure |= np.asarray(no_expression, dtype=bool)
    check_unknown_label(categories, threshold if not unsure.any() else 0.0, unknown_label)
    labels = np.asarray(categories, dtype=object)[probabilities.argmax(axis=1)]
    if threshold is None and not unsure.any():
        return labels, categories
    labels = np.where(unsure, unknown_label, labels)
    return labels.astype(object), [*categories, unknown_label]


def labelling_slots(
    slots: Slots,
    adata: AnnData,
    key: str,
    labels: np.ndarray,
    categories: list[str],
    probabilities: np.ndarray | None,
    vote: Vote | None,
    *,
    keep: Sequence[str] = (),
    replace_stale: bool = True,
) -> None:
    """Add to ``slots`` ``obs[key]`` with these labels, the probability DataFrame and the vote.

    Slots of an earlier call that this one does not write are removed (``replace_stale``: the
    earlier call was scdlkit's), so the AnnData never mixes two annotations; the obs columns in
    ``keep`` (the clusters the vote read) are never removed.
    """
    slots.obs[key] = pd.Categorical(labels, categories=categories)
    prob_key = f"{key}_probabilities"
    if probabilities is not None:
        n_classes = probabilities.shape[1]
        slots.obsm[prob_key] = pd.DataFrame(
            np.asarray(probabilities, dtype=np.float32),
            index=adata.obs_names.copy(),
            columns=probability_columns(categories[:n_classes]),
        )
    elif replace_stale:
        slots.drop_obsm.append(prob_key)
    vote_key, cluster_key = f"{key}_majority_voting", f"{key}_over_clustering"
    stale = [vote_key, cluster_key] if vote is None else [] if vote.computed else [cluster_key]
    if replace_stale:
        slots.drop_obs.extend(c for c in stale if c not in keep)
    if vote is None:
        return
    vote_categories = list(categories)
    if (vote.labels == HETEROGENEOUS).any():
        vote_categories.append(HETEROGENEOUS)
    slots.obs[vote_key] = pd.Categorical(vote.labels, categories=vote_categories)
    if vote.computed:
        order = sorted(set(vote.clusters), key=lambda c: (len(c), c))  # "2" before "10"
        slots.obs[cluster_key] = pd.Categorical(vote.clusters, categories=order)
    slots.uns[key]["majority_voting"] = {"clusters": vote.summary, **h5ad_safe(vote.how)}


def set_labels(
    sets: np.ndarray,
    categories: Sequence[str],
    unknown_label: str,
    *,
    no_expression: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The one class of each single-class prediction set; ``unknown_label`` for an empty set,
    a set of several classes, or a cell without expression."""
    categories = [str(c) for c in categories]
    size = sets.sum(axis=1)
    unsure = size != 1
    if no_expression is not None:
        unsure |= np.asarray(no_expression, dtype=bool)
    labels = np.asarray(categories, dtype=object)[sets.argmax(axis=1)]
    labels = np.where(unsure, unknown_label, labels).astype(object)
    return labels, [*categories, unknown_label]


def conformal_slots(
    slots: Slots,
    adata: AnnData,
    key: str,
    sets: np.ndarray | None,
    categories: Sequence[str],
    record: dict | None,
    *,
    replace_stale: bool = True,
) -> None:
    """``obsm[f"{key}_prediction_set"]`` (cells x classes, boolean), ``obs[f"{key}_set_size"]``
    and ``uns[key]["conformal"]``; with ``sets=None`` the slots of an earlier call are removed."""
    set_key, size_key = f"{key}_prediction_set", f"{key}_set_size"
    if sets is None:
        if replace_stale:
            slots.drop_obsm.append(set_key)
            slots.drop_obs.append(size_key)
        return
    slots.obsm[set_key] = pd.DataFrame(
        np.asarray(sets, dtype=bool),
        index=adata.obs_names.copy(),
        columns=probability_columns([str(c) for c in categories]),
    )
    slots.obs[size_key] = np.asarray(sets.sum(axis=1), dtype=np.int64)
    record = dict(record or {})
    classes = pd.DataFrame(record.pop("classes", []))  # one row per class, as the vote's clusters
    slots.uns[key]["conformal"] = {**h5ad_safe(record), "classes": classes}
