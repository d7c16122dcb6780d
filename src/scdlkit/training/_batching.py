"""Forming batches, sharding them over processes, and putting gathered outputs back in order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

__all__ = ["batch_indices", "gather_in_order", "load_batches", "make_loader", "shard"]


def batch_indices(
    dataset: Any, batch_size: int, *, shuffle: bool, seed: int, epoch: int
) -> list[list[int]]:
    """The dataset's own ``batches(...)`` if it has one, else plain (shuffled) slices."""
    if callable(getattr(dataset, "batches", None)):
        batches = dataset.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
        out = [[int(i) for i in b] for b in batches]
        return [b for b in out if b]
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def shard(batches: list[list[int]], *, rank: int, world_size: int, equal: bool) -> list[list[int]]:
    """Every ``world_size``-th batch from ``rank``; with ``equal`` all ranks get the same count."""
    mine = batches[rank::world_size]
    if equal:
        mine = mine[: len(batches) // world_size]
    return mine


def make_loader(dataset: Any, batches: Sequence[Sequence[int]]) -> DataLoader:
    """A DataLoader over fixed index batches, using ``dataset.collate_fn`` when present."""
    collate = getattr(dataset, "collate_fn", None) or default_collate
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0)


def load_batches(dataset: Any, batches: Sequence[Sequence[int]]) -> Iterable[Any]:
    """The collated batches: ``dataset.get_batch(indices)`` where the dataset has it (in-memory
    tensors, indexed in one operation), else through a DataLoader (:func:`make_loader`)."""
    get_batch = getattr(dataset, "get_batch", None)
    if callable(get_batch):
        return (get_batch(indices) for indices in batches)
    return make_loader(dataset, batches)


def gather_in_order(
    fabric: Any, indices: list[np.ndarray], parts: dict[str, list[np.ndarray]], n: int
) -> dict[str, np.ndarray]:
    """Concatenate per-batch outputs of every rank and sort the rows into dataset order."""
    idx = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    local = {k: np.concatenate(v) for k, v in parts.items() if v}
    if fabric.world_size > 1:
        gathered: list[Any] = [None] * fabric.world_size
        torch.distributed.all_gather_object(gathered, (idx, local))
        idx = np.concatenate([g[0] for g in gathered])
        keys = [k for g in gathered for k in g[1]]
        local = {
            k: np.concatenate([g[1][k] for g in gathered if k in g[1]]) for k in dict.fromkeys(keys)
        }
    order = np.argsort(idx, kind="stable")
    if idx.size != n or not np.array_equal(idx[order], np.arange(n)):
        msg = (
            "The batches did not cover every cell exactly once; `dataset.batches(...)` must "
            "yield each index in range(len(dataset)) exactly once."
        )
        raise ValueError(msg)
    return {k: v[order] for k, v in local.items()}
