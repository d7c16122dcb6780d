from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import matplotlib as mpl
import numpy as np
import pandas as pd

from scdlkit.pl._probabilities import annotation_probabilities, label_probability
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


def _missing_labels_error(adata: AnnData, key: str, column: str) -> KeyError:
    """The tool that writes ``obs[column]``: annotate (with majority voting for the vote)."""
    if column == f"{key}_majority_voting":
        record = adata.uns.get(key)
        vote = record.get("majority_voting") if isinstance(record, Mapping) else None
        if isinstance(vote, Mapping) and not bool(vote.get("performed", True)):
            reason = vote.get("reason", "voting was skipped")
            return KeyError(
                f"adata.obs[{column!r}] not found: sck.tl.annotate skipped the vote ({reason}). "
                "Plot the per-cell labels (majority_voting=False)."
            )
        how = f"sck.tl.annotate(adata, runner, majority_voting=True, key_added={key!r})"
    else:
        how = (
            f"sck.tl.annotate(adata, runner, key_added={key!r}) on a query (or "
            "sck.tl.adapt_annotation on the reference)"
        )
    return KeyError(f"adata.obs[{column!r}] not found: run {how} first.")


def _shown_probability(adata: AnnData, key: str, predicted_key: str) -> np.ndarray:
    """Per cell, the probability of the label shown in ``obs[predicted_key]``.

    The per-cell label is the most probable class, so its probability is the confidence (the
    top probability, also for cells under the threshold). A voted label may not be the cell's
    own: its probability is read from the probability matrix (NaN for ``"Heterogeneous"``).
    """
    if predicted_key == key:
        return adata.obs[f"{key}_confidence"].to_numpy(dtype=np.float64)
    try:
        probabilities = annotation_probabilities(adata, key=key)
    except KeyError as err:
        msg = (
            f"colouring the voted labels by their probability needs adata.obsm"
            f"['{key}_probabilities']: run sck.tl.annotate(adata, runner, majority_voting=True, "
            f"key_added={key!r}) with probabilities=True (the default). ({err.args[0]})"
        )
        raise KeyError(msg) from err
    return label_probability(probabilities, adata.obs[predicted_key].astype(object).to_numpy())


def label_transfer_table(
    adata: AnnData, reference_key: str, *, key: str = "scgpt_annotation", predicted_key: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Share of each reference group given each predicted label, and its mean probability.

    Returns two DataFrames (reference groups x predicted labels): the share of the group's cells
    (rows sum to 1) and the mean probability of the label shown over those cells (NaN where
    none, or where the label is not a class, such as ``"Heterogeneous"``). With
    ``predicted_key`` the per-cell labels that is the confidence (top probability); with the
    majority vote, each cell's probability of its voted label.
    """
    if reference_key not in adata.obs.columns:
        msg = f"reference_key={reference_key!r} is not a column of adata.obs (your groups)."
        raise KeyError(msg)
    for column in (predicted_key, f"{key}_confidence"):
        if column not in adata.obs.columns:
            raise _missing_labels_error(adata, key, column)
    obs = pd.DataFrame(
        {
            "group": adata.obs[reference_key],
            "label": adata.obs[predicted_key],
            "probability": _shown_probability(adata, key, predicted_key),
        },
        index=adata.obs_names,
    )
    obs = obs[obs["group"].notna() & obs["label"].notna()]
    rows, cols = _ordered(obs["group"]), _ordered(obs["label"])
    groups = obs["group"].astype(str)
    labels = obs["label"].astype(str)
    counts = pd.crosstab(groups, labels).reindex(index=rows, columns=cols, fill_value=0)
    share = counts.div(counts.sum(axis=1).clip(lower=1), axis=0)
    mean_probability = (
        obs["probability"]
        .astype(float)
        .groupby([groups.to_numpy(), labels.to_numpy()])
        .mean()
        .unstack()
        .reindex(index=rows, columns=cols)
    )
    return share, mean_probability


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
    given that label (rows add up to 1); its colour is those cells' mean probability of that
    label: the confidence (top probability) for the per-cell labels, the probability of the
    voted label with ``majority_voting=True`` (read from ``obsm[f"{key}_probabilities"]``; a
    ``"Heterogeneous"`` cluster has none and is drawn grey). Pairs with no cell draw no dot.

    Parameters
    ----------
    adata
        AnnData labelled by :func:`scdlkit.tl.annotate` or :func:`scdlkit.tl.adapt_annotation`.
    reference_key
        ``adata.obs`` column with the groups to compare to.
    key
        The ``key_added`` of the annotation: reads ``obs[key]`` and ``obs[f"{key}_confidence"]``.
    majority_voting
        Compare to ``obs[f"{key}_majority_voting"]`` instead of the per-cell labels (and colour
        by the probability of the voted label, from ``obsm[f"{key}_probabilities"]``).
    cmap
        Colormap of the mean probability.
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
    colormap = mpl.colormaps[cmap].with_extremes(bad="0.8")  # no probability: grey
    dots = ax.scatter(
        j,
        i,
        s=share.to_numpy()[i, j] * MAX_DOT_SIZE,
        c=confidence.to_numpy()[i, j],
        cmap=colormap,
        plotnonfinite=True,
        vmin=0.0,
        vmax=1.0,
        edgecolors="0.3",
        linewidths=0.5,
    )
    colorbar = fig.colorbar(dots, ax=ax, fraction=0.05, pad=0.02)
    colorbar.set_label(
        "mean probability of the voted label" if majority_voting else "mean confidence"
    )
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
