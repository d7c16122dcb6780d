"""How well a cell representation keeps labelled cell types apart.

Both metrics take integer label codes where ``-1`` marks an unlabelled cell (left out), and
return ``None`` (never ``NaN``) when undefined, like :mod:`scdlkit.training.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import silhouette_score

__all__ = ["knn_label_consistency", "silhouette"]


def _labelled(latent: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(latent, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2:
        msg = f"`latent` must be a 2-D array (cells x dimensions); got shape {x.shape}."
        raise ValueError(msg)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        msg = f"`labels` must hold one code per row of `latent` ({x.shape[0]}); got {y.shape}."
        raise ValueError(msg)
    if not np.issubdtype(y.dtype, np.integer):
        msg = "`labels` must be integer label codes (-1 for unlabelled)."
        raise ValueError(msg)
    if not np.isfinite(x).all():
        msg = "`latent` holds NaN or infinite values."
        raise ValueError(msg)
    mask = y >= 0
    return x[mask], y[mask].astype(np.int64)


def knn_label_consistency(latent: Any, labels: Any, *, k: int = 15) -> float | None:
    """Mean fraction of each cell's ``k`` nearest neighbours that share its label.

    Neighbours are found by Euclidean distance among the labelled cells, the cell itself
    excluded. With fewer labelled cells than ``k + 1`` every other labelled cell is a neighbour.
    A random representation scores about ``sum_c p_c**2`` (the chance that two cells share a
    label); a perfect one scores 1.

    Parameters
    ----------
    latent
        Cell representation, shape ``(n, d)``.
    labels
        Integer label codes, shape ``(n,)``; ``-1`` (unlabelled) is left out.
    k
        Number of neighbours.

    Returns
    -------
    float or None
        In ``[0, 1]``; ``None`` with fewer than two labelled cells.

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.baselines import knn_label_consistency
    >>> x = np.array([[0.0], [0.1], [5.0], [5.1]])
    >>> knn_label_consistency(x, np.array([0, 0, 1, 1]), k=1)
    1.0
    """
    # Lazy: sklearn.neighbors costs about 0.1-0.2 s to import, and only this metric needs it.
    from sklearn.neighbors import NearestNeighbors

    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        msg = f"`k` must be an integer >= 1; got {k!r}."
        raise ValueError(msg)
    x, y = _labelled(latent, labels)
    if y.size < 2:
        return None
    k_eff = min(int(k), y.size - 1)
    neighbours = NearestNeighbors(n_neighbors=k_eff).fit(x).kneighbors(return_distance=False)
    return float(np.mean(y[neighbours] == y[:, None]))


def silhouette(latent: Any, labels: Any) -> float | None:
    """Silhouette coefficient of the labelled cells, grouped by label (Euclidean).

    Parameters
    ----------
    latent
        Cell representation, shape ``(n, d)``.
    labels
        Integer label codes, shape ``(n,)``; ``-1`` (unlabelled) is left out.

    Returns
    -------
    float or None
        In ``[-1, 1]``; ``None`` unless there are at least two labels and fewer labels than
        labelled cells.

    Examples
    --------
    >>> import numpy as np
    >>> from scdlkit.baselines import silhouette
    >>> x = np.array([[0.0], [0.1], [5.0], [5.1]])
    >>> round(silhouette(x, np.array([0, 0, 1, 1])), 2)
    0.98
    """
    x, y = _labelled(latent, labels)
    n_labels = np.unique(y).size
    if n_labels < 2 or n_labels >= y.size:
        return None
    value = float(silhouette_score(x, y))
    return value if math.isfinite(value) else None
