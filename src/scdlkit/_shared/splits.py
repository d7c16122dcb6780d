"""Reproducible train/validation/test splits, one implementation for both runners.

:func:`stratified_split` splits cells group by group (cell type, say) with rare groups kept in
training; :func:`choose_held_out` picks whole groups (batches, donors) to hold out. Both take a
seed or a :class:`numpy.random.Generator`, so a caller can chain several draws on one generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MIN_CELLS_TO_STRATIFY",
    "SPLIT_NAMES",
    "allocate_split_counts",
    "choose_held_out",
    "stratified_split",
]

SPLIT_NAMES = ("train", "val", "test")
#: A class needs this many cells to appear in train, validation and test.
MIN_CELLS_TO_STRATIFY = 3


def allocate_split_counts(n: int, val_size: float, test_size: float) -> tuple[int, int]:
    """Validation and test counts for a group of ``n`` cells.

    Each non-zero fraction gets at least one cell, and at least one cell stays in training
    (validation gives way first).

    Examples
    --------
    >>> allocate_split_counts(10, 0.15, 0.15)
    (2, 2)
    >>> allocate_split_counts(2, 0.15, 0.15)
    (0, 1)
    """
    n_test = round(n * test_size)
    n_val = round(n * val_size)
    if test_size > 0:
        n_test = max(n_test, 1)
    if val_size > 0:
        n_val = max(n_val, 1)
    while n_test + n_val > n - 1:  # keep at least one training cell
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def stratified_split(
    cells: np.ndarray,
    strata: np.ndarray | None = None,
    *,
    val_size: float,
    test_size: float,
    random_state: int | np.random.Generator,
    min_cells: int = MIN_CELLS_TO_STRATIFY,
) -> tuple[dict[str, np.ndarray], list]:
    """Split ``cells`` into train/val/test, each stratum (e.g. class code) in proportion.

    Strata are visited in sorted order and each is permuted with the same generator, so the
    split depends only on the inputs and the seed.

    Parameters
    ----------
    cells
        Cell indices to split.
    strata
        Group of each entry of ``cells`` (same length); each group is split separately.
        ``None`` splits all cells as one group.
    val_size, test_size
        Fractions of each group for validation and test (at least one cell each where the group
        has ``min_cells`` or more; at least one cell always stays in training).
    random_state
        Seed of the permutation (same inputs, same split), or a generator to draw from.
    min_cells
        Smaller groups go wholly to ``train`` (when ``val_size`` or ``test_size`` is non-zero);
        0 turns this off.

    Returns
    -------
    tuple
        ``{"train", "val", "test"}`` -> sorted int64 index arrays, and the strata that were too
        small (as Python scalars, in sorted order).

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.baselines import stratified_split
    >>> parts, small = stratified_split(
    ...     np.arange(20), np.repeat([0, 1], 10), val_size=0.2, test_size=0.2, random_state=0
    ... )
    >>> [len(parts[s]) for s in ("train", "val", "test")], small
    ([12, 4, 4], [])
    """
    cells = np.asarray(cells, dtype=np.int64)
    # default_rng returns a Generator passed to it unchanged, so draws continue on it.
    rng = np.random.default_rng(random_state)
    if strata is None:
        groups = [(None, cells)]
    else:
        strata = np.asarray(strata)
        groups = [(stratum, cells[strata == stratum]) for stratum in np.unique(strata)]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    small: list = []
    for stratum, members in groups:
        group = rng.permutation(members)
        if len(group) < min_cells and (val_size or test_size):
            small.append(stratum.item() if isinstance(stratum, np.generic) else stratum)
            parts["train"].append(group)
            continue
        n_val, n_test = allocate_split_counts(len(group), val_size, test_size)
        parts["test"].append(group[:n_test])
        parts["val"].append(group[n_test : n_test + n_val])
        parts["train"].append(group[n_test + n_val :])
    empty = np.zeros(0, np.int64)
    out = {name: np.sort(np.concatenate(p)) if p else empty for name, p in parts.items()}
    return out, small


def choose_held_out(
    names: Sequence[str],
    requested: Sequence[str] | None,
    fraction: float,
    rng: np.random.Generator,
    *,
    role: str,
) -> list[str]:
    """Groups (batches, donors, studies) to hold out as one split.

    Parameters
    ----------
    names
        The groups there are, sorted.
    requested
        Groups named by the user; checked against ``names`` and returned as strings.
    fraction
        Without ``requested``: hold out ``round(len(names) * fraction)`` groups (at least one
        unless ``fraction`` is 0), drawn from ``rng`` and returned sorted.
    rng
        Generator to draw from (not reseeded, so successive calls differ).
    role
        ``"test"`` or ``"val"``; names the argument in the error for unknown groups.

    Examples
    --------
    >>> import numpy as np
    >>> choose_held_out(["a", "b", "c"], ["b"], 0.2, np.random.default_rng(0), role="test")
    ['b']
    """
    names = list(names)
    if requested is not None:
        unknown = sorted(set(map(str, requested)) - set(names))
        if unknown:
            msg = f"{role}_batches={unknown} are not batches of the data ({', '.join(names)})."
            raise ValueError(msg)
        return [str(b) for b in requested]
    if fraction == 0:
        return []
    n = max(1, round(len(names) * fraction))
    return sorted(rng.choice(names, size=min(n, len(names)), replace=False).tolist())
