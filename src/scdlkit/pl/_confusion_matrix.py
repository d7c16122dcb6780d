from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdlkit.pl._utils import (
    annotation_uns,
    finish,
    get_axes,
    label_categories,
    missing_slot_error,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["confusion_matrix"]

_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test", "all": "all"}
_MAX_ANNOTATED = 20


def confusion_counts(
    adata: AnnData, *, key: str, split: str, label_key: str | None
) -> tuple[np.ndarray, list[str], list[str], str, str]:
    """Counts (true x predicted), row and column labels, the label key and the split used."""
    if split not in _SPLITS:
        msg = f"split={split!r} is not one of 'train', 'val' ('validation'), 'test' or 'all'"
        raise ValueError(msg)
    split = _SPLITS[split]
    uns = annotation_uns(adata, key, query_ok=True)
    if label_key is None:
        params = uns.get("params")
        if not hasattr(params, "get") or params.get("label_key") is None:
            raise missing_slot_error(
                key,
                f"adata.uns[{key!r}]['params']['label_key']",
                extra="or pass label_key= naming the obs column with the true labels",
            )
        label_key = str(params["label_key"])
    if label_key not in adata.obs.columns:
        msg = f"label_key={label_key!r} is not a column of adata.obs (the true labels)"
        raise KeyError(msg)
    if key not in adata.obs.columns:
        raise missing_slot_error(key, f"adata.obs[{key!r}] (the predicted labels)", query_ok=True)
    categories = label_categories(uns, key)

    true = adata.obs[label_key]
    mask = true.notna().to_numpy()
    if split != "all":
        split_key = f"{key}_split"
        if split_key not in adata.obs.columns:
            raise missing_slot_error(key, f"adata.obs[{split_key!r}]", extra="or use split='all'")
        in_split = (adata.obs[split_key].astype(object) == split).to_numpy()
        if not in_split.any():
            present = sorted(set(map(str, adata.obs[split_key].dropna().unique())))
            msg = (
                f"no cells with adata.obs[{split_key!r}] == {split!r}; "
                f"values present: {present}. Use split='all' for all labelled cells"
            )
            raise ValueError(msg)
        mask &= in_split
    if not mask.any():
        msg = f"no labelled cells (non-missing adata.obs[{label_key!r}]) in split {split!r}"
        raise ValueError(msg)

    true_labels = np.asarray(true.to_numpy()[mask], dtype=object).astype(str)
    predicted = adata.obs[key].to_numpy()[mask]
    pred_labels = np.array(["nan" if pd.isna(p) else str(p) for p in predicted], dtype=object)

    rows = list(categories) + sorted(set(true_labels) - set(categories))
    extra_cols = set(pred_labels) - set(categories)
    pred_order = adata.obs[key]
    if isinstance(pred_order.dtype, pd.CategoricalDtype):
        order = [str(c) for c in pred_order.cat.categories]
    else:
        order = []
    cols = list(categories)
    cols += [c for c in order if c in extra_cols]
    cols += sorted(extra_cols - set(cols))

    row_index = {label: i for i, label in enumerate(rows)}
    col_index = {label: j for j, label in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(
        counts,
        (
            np.fromiter((row_index[t] for t in true_labels), dtype=np.intp, count=len(true_labels)),
            np.fromiter((col_index[p] for p in pred_labels), dtype=np.intp, count=len(pred_labels)),
        ),
        1,
    )
    return counts, rows, cols, label_key, split


def confusion_matrix(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    split: str = "test",
    normalize: bool = True,
    label_key: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    cmap: str = "Blues",
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Heatmap of true against predicted labels of :func:`scdlkit.tl.adapt_annotation`.

    Rows are the true labels (``adata.obs[label_key]``) and columns the predicted labels
    (``adata.obs[key]``, the best strategy's), both in the order of
    ``uns[key]["label_categories"]``. Predicted labels outside the label categories (such as
    ``"Unknown"`` from a confidence threshold) get extra columns. Cells without a true label are
    left out. With ``normalize=True`` each row holds the fraction of that class's cells given
    each label (its diagonal is the per-class recall; a class absent from the split gets a row
    of zeros). Cells are annotated with their value when there are at most 20 classes.

    Parameters
    ----------
    adata
        AnnData annotated by :func:`scdlkit.tl.adapt_annotation`.
    key
        The ``key_added`` of that call; reads ``adata.obs[key]``,
        ``adata.obs[f"{key}_split"]`` and ``adata.uns[key]``.
    split
        Cells to count: ``"test"`` (held out), ``"val"`` (alias ``"validation"``),
        ``"train"`` or ``"all"`` (every labelled cell).
    normalize
        Normalise each row to fractions; otherwise show cell counts.
    label_key
        Column of ``adata.obs`` with the true labels; default
        ``adata.uns[key]["params"]["label_key"]``.
    ax
        Axes to draw into; a new figure is created when ``None``.
    show
        Show the figure. ``None``: show it when it is not returned and matplotlib is
        interactive (as in a notebook).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.
    cmap
        Matplotlib colormap.
    save
        Path to save the figure to (format from the file extension).

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> import scdlkit as sck
    >>> sck.tl.adapt_annotation(adata, "cell_type")  # doctest: +SKIP
    >>> sck.pl.confusion_matrix(adata)  # doctest: +SKIP
    >>> sck.pl.confusion_matrix(adata, split="all", normalize=False)  # doctest: +SKIP
    """
    counts, rows, cols, label_key, split = confusion_counts(
        adata, key=key, split=split, label_key=label_key
    )
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(
            counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0
        )
    else:
        values = counts

    size = max(4.0, 1.6 + 0.42 * max(len(rows), len(cols)))
    fig, ax, created = get_axes(ax, figsize=(size + 1.0, size))
    vmax = 1.0 if normalize else max(1, int(counts.max()))
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="none")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true class" if normalize else "cells")

    if max(len(rows), len(cols)) <= _MAX_ANNOTATED:
        threshold = vmax / 2.0
        fontsize = 8 if max(len(rows), len(cols)) > 10 else 9
        for i in range(len(rows)):
            for j in range(len(cols)):
                value = values[i, j]
                text = f"{value:.2f}" if normalize else f"{int(value)}"
                color = "white" if value > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)

    ax.set_xticks(np.arange(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(rows)), labels=rows)
    ax.set_xlabel(f"predicted ({key})")
    ax.set_ylabel(f"true ({label_key})")
    uns = adata.uns[key]
    best = uns.get("best_strategy") if hasattr(uns, "get") else None
    n_cells = int(counts.sum())
    where = "all labelled cells" if split == "all" else f"{split} cells"
    title = f"{where}, n={n_cells}"
    if best is not None:
        title = f"{best}: {title}"
    ax.set_title(title)
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)
