"""Honest comparison: training batches that change between epochs, one fixed outer test set,
intervals named for what they cover, a step budget with a floor and a cap."""

from __future__ import annotations

import numpy as np

from scdlkit.foundation._tokenize import length_grouped_batches


def _pairs(lengths, epoch):
    pairs = set()
    for batch in length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=epoch):
        members = np.sort(batch)
        pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1 :])
    return pairs


def test_small_data_batches_change_between_epochs():
    lengths = np.random.default_rng(0).integers(200, 1200, 600)
    first, second = _pairs(lengths, 0), _pairs(lengths, 1)
    # an exact length sort (one mega-batch holds all 600 cells) repeats 99% of the pairs
    assert len(first & second) / len(first) < 0.7
    cells = np.concatenate(list(length_grouped_batches(lengths, 64, shuffle=True, epoch=1)))
    assert np.array_equal(np.sort(cells), np.arange(600))
    again = list(length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=1))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            again, length_grouped_batches(lengths, 64, shuffle=True, seed=3, epoch=1), strict=True
        )
    )
