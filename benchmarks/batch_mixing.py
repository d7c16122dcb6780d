"""How much training batches change between epochs, against the padding they cost.

Shuffled batches group cells of similar length (less padding). On small data one mega-batch
holds every cell, so an exact length sort gives the same batches every epoch; a jitter of the
lengths before sorting mixes them. For each jitter and dataset size this prints the share of
same-batch cell pairs of epoch 0 that are again together in epoch 1, and the padded positions
beyond the cells' own tokens. Lengths are drawn uniformly from 200-1,200 expressed genes (about
pbmc68k's spread of scGPT sequence lengths); 64-cell batches, as the runner's default.

Run: ``python benchmarks/batch_mixing.py``.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

from scdlkit.foundation._batching import LENGTH_JITTER, length_grouped_batches


def same_batch_pairs(lengths: np.ndarray, batch_size: int, jitter: float, epoch: int) -> set:
    pairs = set()
    for batch in length_grouped_batches(
        lengths, batch_size, shuffle=True, seed=0, epoch=epoch, jitter=jitter
    ):
        members = np.sort(batch)
        pairs.update((int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :])
    return pairs


def padding(lengths: np.ndarray, batch_size: int, jitter: float) -> float:
    padded = used = 0
    for batch in length_grouped_batches(
        lengths, batch_size, shuffle=True, seed=0, epoch=0, jitter=jitter
    ):
        padded += len(batch) * int(lengths[batch].max())
        used += int(lengths[batch].sum())
    return padded / used - 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 3200, 10000])
    parser.add_argument("--jitters", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}; default jitter {LENGTH_JITTER}")
    print("| jitter | cells | recurring same-batch pairs | extra padded positions |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        lengths = rng.integers(200, 1200, n)
        for jitter in args.jitters:
            first = same_batch_pairs(lengths, args.batch_size, jitter, 0)
            second = same_batch_pairs(lengths, args.batch_size, jitter, 1)
            recur = len(first & second) / len(first)
            extra = padding(lengths, args.batch_size, jitter)
            print(f"| {jitter} | {n} | {recur:.3f} | {extra:.3f} |")


if __name__ == "__main__":
    main()
