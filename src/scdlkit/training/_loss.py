"""The classification loss and class weights of the Trainer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LABELS",
    "balanced_weights",
    "batch_labels",
    "cross_entropy",
    "get_logits",
    "label_counts",
    "check_label_range",
    "count_classes",
]

LABELS = "labels"


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled cells; 0 (not NaN) for a batch without labels."""
    labels = labels.long().reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        msg = f"batch['labels'] has {labels.shape[0]} entries for {logits.shape[0]} logits rows."
        raise ValueError(msg)
    mask = labels >= 0
    if weight is not None:
        weight = weight.to(logits.device, logits.dtype)
    total = F.cross_entropy(logits, labels, weight=weight, ignore_index=-1, reduction="sum")
    safe = labels.clamp(min=0)
    per_cell = weight[safe] if weight is not None else torch.ones_like(safe, dtype=logits.dtype)
    denominator = (per_cell * mask).sum()
    return total / denominator.clamp(min=1e-12), total, denominator


def get_logits(output: Mapping[str, Any]) -> torch.Tensor:
    logits = output.get("logits")
    if not torch.is_tensor(logits) or logits.ndim != 2:
        msg = (
            "task='classification' needs `model(batch)` to return 'logits' of shape "
            "(batch, n_classes), or a scalar 'loss'."
        )
        raise ValueError(msg)
    return logits


def count_classes(output: Mapping[str, Any]) -> int:
    return int(get_logits(output).shape[1])


def check_label_range(dataset: Any, n_classes: int) -> None:
    """Fail early (not with a CUDA device assert) when ``dataset.labels`` exceeds the logits."""
    labels = getattr(dataset, LABELS, None)
    if labels is None or len(labels) == 0:
        return
    top = int(np.max(np.asarray(labels)))
    if top >= n_classes:
        msg = (
            f"The dataset's labels hold code {top} but the model returns {n_classes} logits; "
            "give the model one output per class."
        )
        raise ValueError(msg)


def batch_labels(batch: Any) -> torch.Tensor:
    labels = batch.get(LABELS) if isinstance(batch, Mapping) else None
    if not torch.is_tensor(labels):
        msg = "task='classification' needs `dataset[i]` to hold 'labels' (class code, -1 = none)."
        raise ValueError(msg)
    return labels


def label_counts(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, LABELS, None)
    if labels is None:
        labels = [int(np.asarray(dataset[i][LABELS])) for i in range(len(dataset))]
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    labels = labels[labels >= 0]
    if labels.size == 0:
        msg = "class_weight='balanced' needs labelled training cells; `train` has none."
        raise ValueError(msg)
    return np.bincount(labels)


def balanced_weights(counts: np.ndarray, n_classes: int) -> torch.Tensor:
    if counts.size > n_classes:
        msg = (
            f"The training labels hold code {counts.size - 1} but the model returns "
            f"{n_classes} logits; give the model one output per class."
        )
        raise ValueError(msg)
    counts = np.pad(counts, (0, n_classes - counts.size)).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)
