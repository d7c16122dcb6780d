from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdlkit.pl._utils import (
    BASELINE_HATCH,
    METRIC_LABELS,
    annotation_uns,
    as_frame,
    check_not_a_query,
    finish,
    get_axes,
    strategy_colors,
    strategy_display_name,
    to_str_list,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["batch_metrics"]

_REQUIRED = ("strategy", "batch")
_MAX_ANNOTATED = 24


def _ordered_unique(values: pd.Series) -> list[str]:
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(map(str, values.dropna().unique()))
        return [str(c) for c in values.cat.categories if str(c) in present]
    return list(dict.fromkeys(str(v) for v in values.dropna()))


def batch_metrics(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    metric: str = "macro_f1",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Per-batch test metrics of each strategy from a batch-aware ``sck.tl.adapt_annotation``.

    Grouped bars: one group per held-out batch (labelled with its number of cells), one bar per
    strategy within each group, in each strategy's colour (the non-foundation ``baseline`` grey
    and hatched; the best strategy marked ``(best)`` in the legend). A strategy without a value
    for a batch gets an empty bar labelled ``n/a``. Values are written on the bars when there are
    at most 24 of them.

    Parameters
    ----------
    adata
        AnnData annotated by :func:`scdlkit.tl.adapt_annotation` with ``split_by="batch"``.
    key
        The ``key_added`` of that call; reads ``adata.uns[key]["batch_metrics"]``.
    metric
        ``"macro_f1"`` (default), ``"accuracy"`` or another numeric column of the batch metrics.
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
    >>> import scdlkit as sck
    >>> sck.tl.adapt_annotation(adata, "cell_type", split_by="batch")  # doctest: +SKIP
    >>> sck.pl.batch_metrics(adata, metric="accuracy")  # doctest: +SKIP
    """
    uns = annotation_uns(adata, key)
    if "batch_metrics" not in uns:
        check_not_a_query(uns, key, "batch_metrics")
        msg = (
            f"adata.uns[{key!r}]['batch_metrics'] not found: per-batch metrics are written by "
            f"sck.tl.adapt_annotation(adata, label_key, split_by='batch', key_added={key!r}), "
            f"which holds out whole batches as the test set"
        )
        raise KeyError(msg)
    frame = as_frame(uns["batch_metrics"], key, "batch_metrics")
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        msg = (
            f"adata.uns[{key!r}]['batch_metrics'] lacks column(s) {missing}; "
            f"columns: {list(frame.columns)}"
        )
        raise KeyError(msg)
    choices = [c for c in frame.columns if c not in (*_REQUIRED, "n_cells")]
    if metric not in choices:
        msg = f"metric={metric!r} is not a column of adata.uns[{key!r}]['batch_metrics']: {choices}"
        raise ValueError(msg)
    if frame.empty:
        msg = f"adata.uns[{key!r}]['batch_metrics'] has no rows"
        raise ValueError(msg)

    params = uns.get("params")
    order = to_str_list(params.get("strategies")) if hasattr(params, "get") else []
    present = _ordered_unique(frame["strategy"])
    strategies = [s for s in order if s in present] + [s for s in present if s not in order]
    batches = _ordered_unique(frame["batch"])
    best = uns.get("best_strategy")
    best = None if best is None else str(best)

    data = pd.DataFrame(
        {
            "strategy": frame["strategy"].astype(str).to_numpy(),
            "batch": frame["batch"].astype(str).to_numpy(),
            "value": pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float),
        }
    )
    table = (
        data.groupby(["strategy", "batch"], sort=False)["value"]
        .mean()
        .unstack("batch")
        .reindex(index=strategies, columns=batches)
    )
    values = table.to_numpy(dtype=float)
    n_cells: dict[str, int] = {}
    if "n_cells" in frame.columns:
        cells = (
            pd.Series(
                pd.to_numeric(frame["n_cells"], errors="coerce").to_numpy(dtype=float),
                index=frame["batch"].astype(str).to_numpy(),
            )
            .groupby(level=0)
            .max()
        )
        n_cells = {b: int(cells[b]) for b in batches if np.isfinite(cells.get(b, np.nan))}

    n_s, n_b = len(strategies), len(batches)
    fig, ax, created = get_axes(ax, figsize=(max(5.0, 1.6 + n_b * (0.35 * n_s + 0.5)), 4.2))
    colors = strategy_colors(strategies)
    width = 0.8 / n_s
    positions = np.arange(n_b, dtype=float)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    upper = 1.0 if 0.0 <= top <= 1.0 else top
    annotate = n_s * n_b <= _MAX_ANNOTATED
    for i, strategy in enumerate(strategies):
        x = positions - 0.4 + width * (i + 0.5)
        row = values[i]
        bars = ax.bar(
            x,
            np.nan_to_num(row, nan=0.0),
            width=width,
            color=colors[strategy],
            edgecolor="#4d4d4d",
            linewidth=0.6,
            label=strategy_display_name(strategy, best),
        )
        if strategy == "baseline":
            for bar in bars.patches:
                bar.set_hatch(BASELINE_HATCH)
        for xi, value in zip(x, row, strict=True):
            if not np.isfinite(value):
                text = "n/a"
            elif annotate:
                text = f"{value:.2f}"
            else:
                continue
            y = (value if np.isfinite(value) else 0.0) + 0.01 * upper
            ax.text(xi, y, text, ha="center", va="bottom", rotation=90, fontsize=7)

    labels = [f"{b}\n(n={n_cells[b]})" if b in n_cells else b for b in batches]
    ax.set_xticks(positions, labels=labels)
    ax.set_xlim(-0.6, n_b - 0.4)
    ax.set_ylim(0.0, upper * 1.18)
    ax.set_xlabel("held-out batch")
    ax.set_ylabel(f"test {METRIC_LABELS.get(metric, metric)}")
    ax.set_title("Per-batch test performance")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)
