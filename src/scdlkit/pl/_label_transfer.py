from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdlkit.pl._utils import finish, get_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["label_transfer", "label_transfer_table"]

#: Marker area (points^2) of a group whose cells all got one label.
MAX_DOT_SIZE = 300.0


def _ordered(column: pd.Series) -> list[str]:
    values = set(column.dropna().astype(str))
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in values]
    return sorted(values)


def _missing_labels_error(key: str, column: str) -> KeyError:
    """The tool that writes ``obs[column]``: annotate (with majority voting for the vote)."""
    if column == f"{key}_majority_voting":
        how = f"sck.tl.annotate(adata, runner, majority_voting=True, key_added={key!r})"
    else:
        how = (
            f"sck.tl.annotate(adata, runner, key_added={key!r}) (or sck.tl.adapt_annotation on "
            "the reference)"
        )
    return KeyError(f"adata.obs[{column!r}] not found: run {how} first.")


def label_transfer_table(
    adata: AnnData, reference_key: str, *, key: str = "scgpt_annotation", predicted_key: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Share of each reference group given each predicted label, and their mean confidence.

    Returns two DataFrames (reference groups x predicted labels): the share of the group's cells
    (rows sum to 1) and the mean ``obs[f"{key}_confidence"]`` of those cells (NaN where none).
    """
    if reference_key not in adata.obs.columns:
        msg = f"reference_key={reference_key!r} is not a column of adata.obs (your groups)."
        raise KeyError(msg)
    for column in (predicted_key, f"{key}_confidence"):
        if column not in adata.obs.columns:
            raise _missing_labels_error(key, column)
    obs = adata.obs[[reference_key, predicted_key, f"{key}_confidence"]].dropna()
    rows, cols = _ordered(obs[reference_key]), _ordered(obs[predicted_key])
    groups = obs[reference_key].astype(str)
    labels = obs[predicted_key].astype(str)
    confidence = obs[f"{key}_confidence"].astype(float)
    counts = pd.crosstab(groups, labels).reindex(index=rows, columns=cols, fill_value=0)
    share = counts.div(counts.sum(axis=1).clip(lower=1), axis=0)
    mean_conf = (
        confidence.groupby([groups.to_numpy(), labels.to_numpy()])
        .mean()
        .unstack()
        .reindex(index=rows, columns=cols)
    )
    return share, mean_conf


def label_transfer(
    adata: AnnData,
    reference_key: str,
    *,
    key: str = "scgpt_annotation",
    majority_voting: bool = False,
    cmap: str = "viridis",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Dot plot of the user's groups against the predicted labels (CellTypist's ``dotplot``).

    One row per group of ``adata.obs[reference_key]`` (clusters, or labels of another
    annotation), one column per predicted label. A dot's size is the share of the group's cells
    given that label (rows add up to 1); its colour is those cells' mean confidence (top
    probability). Pairs with no cell draw no dot.

    Parameters
    ----------
    adata
        AnnData labelled by :func:`scdlkit.tl.annotate` or :func:`scdlkit.tl.adapt_annotation`.
    reference_key
        ``adata.obs`` column with the groups to compare to.
    key
        The ``key_added`` of the annotation: reads ``obs[key]`` and ``obs[f"{key}_confidence"]``.
    majority_voting
        Compare to ``obs[f"{key}_majority_voting"]`` instead of the per-cell labels.
    cmap
        Colormap of the mean confidence.
    ax
        Axes to draw into; a new figure is created when ``None``.
    show
        Show the figure. ``None``: show it when it is not returned and matplotlib is
        interactive (as in a notebook).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.
    save
        Path to save the figure to (format from the file extension).

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> sck.tl.annotate(query, runner_dir)  # doctest: +SKIP
    >>> sck.pl.label_transfer(query, "leiden")  # doctest: +SKIP
    """
    predicted_key = f"{key}_majority_voting" if majority_voting else key
    share, confidence = label_transfer_table(
        adata, reference_key, key=key, predicted_key=predicted_key
    )
    rows, cols = list(share.index), list(share.columns)
    fig, ax, created = get_axes(
        ax, figsize=(max(5.0, 3.0 + 0.5 * len(cols)), max(3.5, 2.0 + 0.4 * len(rows)))
    )
    i, j = np.nonzero(share.to_numpy() > 0)
    dots = ax.scatter(
        j,
        i,
        s=share.to_numpy()[i, j] * MAX_DOT_SIZE,
        c=confidence.to_numpy()[i, j],
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        edgecolors="0.3",
        linewidths=0.5,
    )
    colorbar = fig.colorbar(dots, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label("mean confidence")
    for value in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=value * MAX_DOT_SIZE, c="0.6", label=f"{value:.0%}")
    ax.legend(
        title="share of group",
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        ncols=3,
        frameon=False,
        columnspacing=2.0,
    )
    ax.set_xticks(np.arange(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(rows)), labels=rows)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"predicted ({predicted_key})")
    n_cells = int(share.shape[0] and adata.obs[reference_key].notna().sum())
    ax.set_ylabel(f"{reference_key} (n={n_cells} cells)")
    ax.grid(True, color="0.92", zorder=0)
    ax.set_axisbelow(True)
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)
