from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from scdlkit.pl._utils import (
    METRIC_LABELS,
    annotation_uns,
    as_frame,
    check_not_a_query,
    finish,
    get_axes,
    missing_slot_error,
    strategy_colors,
    strategy_display_name,
    to_str_list,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["training_history"]

_NO_HISTORY = (
    "only strategies trained epoch by epoch record one; strategies fitted without epochs "
    "(such as frozen_probe and baseline) do not"
)


def _histories(adata: AnnData, key: str) -> tuple[dict[str, pd.DataFrame], str | None, list[str]]:
    uns = annotation_uns(adata, key)
    if "history" not in uns:
        check_not_a_query(uns, key, "history")
        raise missing_slot_error(key, f"adata.uns[{key!r}]['history']", extra=_NO_HISTORY)
    history = uns["history"]
    if not isinstance(history, Mapping):
        msg = f"adata.uns[{key!r}]['history'] is a {type(history).__name__}, expected a dict"
        raise TypeError(msg)
    frames = {
        str(name): as_frame(frame, key, f"history/{name}")
        for name, frame in history.items()
        if frame is not None
    }
    frames = {name: frame for name, frame in frames.items() if not frame.empty}
    if not frames:
        msg = f"no training history was recorded in adata.uns[{key!r}]['history']: {_NO_HISTORY}"
        raise ValueError(msg)
    params = uns.get("params")
    order = to_str_list(params.get("strategies")) if hasattr(params, "get") else []
    best = uns.get("best_strategy")
    return frames, (None if best is None else str(best)), order


def training_history(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    strategies: Sequence[str] | str | None = None,
    metric: str = "loss",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Per-epoch learning curves of the strategies trained by :func:`scdlkit.tl.adapt_annotation`.

    One colour per strategy (the best one marked ``(best)`` in the legend and drawn thicker).
    ``metric="loss"`` draws the training loss (solid) and the validation loss (dashed); any other
    metric draws the validation column ``f"val_{metric}"`` of the history (or the column named
    ``metric`` itself, e.g. ``"lr"``). Only strategies trained epoch by epoch have a history;
    ``frozen_probe`` and ``baseline`` have none.

    Parameters
    ----------
    adata
        AnnData annotated by :func:`scdlkit.tl.adapt_annotation`.
    key
        The ``key_added`` of that call; reads ``adata.uns[key]["history"]``.
    strategies
        Strategies to draw; default every strategy with a recorded history.
    metric
        ``"loss"`` (default), ``"accuracy"`` or ``"macro_f1"`` (validation), or another column
        of the history such as ``"lr"`` or ``"seconds"``.
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
    >>> sck.tl.adapt_annotation(adata, "cell_type", strategies=("head", "lora"))  # doctest: +SKIP
    >>> sck.pl.training_history(adata)  # doctest: +SKIP
    >>> sck.pl.training_history(adata, metric="macro_f1", strategies=["lora"])  # doctest: +SKIP
    """
    frames, best, order = _histories(adata, key)
    if strategies is None:
        selected = [s for s in order if s in frames] + [s for s in frames if s not in order]
    else:
        selected = to_str_list(strategies)
        missing = [s for s in selected if s not in frames]
        if missing:
            msg = (
                f"no training history for strategies {missing} in adata.uns[{key!r}]['history']; "
                f"recorded: {sorted(frames)} ({_NO_HISTORY})"
            )
            raise ValueError(msg)
        if not selected:
            msg = "strategies is empty: pass None for every strategy with a history"
            raise ValueError(msg)

    if metric == "loss":
        columns = [("train_loss", "-", "train"), ("val_loss", "--", "val")]
        ylabel = "loss"
    else:
        column = f"val_{metric}"
        if not any(column in frames[s].columns for s in selected):
            column = metric
        columns = [(column, "-", "")]
        label = METRIC_LABELS.get(metric, metric)
        ylabel = f"validation {label}" if column.startswith("val_") else label
    if not any(c in frames[s].columns for s in selected for c, _, _ in columns):
        available = sorted({c for s in selected for c in frames[s].columns} - {"epoch"})
        msg = f"metric={metric!r} is not in the recorded history; columns: {available}"
        raise ValueError(msg)

    fig, ax, created = get_axes(ax, figsize=(6.4, 4.2))
    colors = strategy_colors(selected)
    drawn: set[str] = set()
    for strategy in selected:
        frame = frames[strategy]
        if "epoch" in frame.columns:
            epochs = pd.to_numeric(frame["epoch"], errors="coerce").to_numpy(dtype=float)
        else:
            epochs = np.arange(1, len(frame) + 1, dtype=float)
        name = strategy_display_name(strategy, best)
        for column, style, suffix in columns:
            if column not in frame.columns:
                continue
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
            drawn.add(column)
            ax.plot(
                epochs,
                values,
                linestyle=style,
                color=colors[strategy],
                linewidth=2.4 if strategy == best else 1.5,
                marker="o" if len(frame) <= 30 else None,
                markersize=3.5,
                label=f"{name} ({suffix})" if suffix else name,
            )

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title("Training history")
    ax.spines[["top", "right"]].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    if metric == "loss":
        # one entry per strategy (colour) plus the line-style key
        handles, labels = [], []
        for strategy in selected:
            handles.append(Line2D([], [], color=colors[strategy], linewidth=2.0))
            labels.append(strategy_display_name(strategy, best))
        for column, style, label in (
            ("train_loss", "-", "train"),
            ("val_loss", "--", "validation"),
        ):
            if column in drawn:
                handles.append(Line2D([], [], color="#4d4d4d", linestyle=style))
                labels.append(label)
    ax.legend(handles, labels, frameon=False, fontsize=8)
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)
