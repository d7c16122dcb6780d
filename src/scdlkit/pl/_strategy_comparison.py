from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdlkit.pl._utils import (
    BAR_COLOR,
    BASELINE_COLOR,
    BASELINE_HATCH,
    BEST_COLOR,
    METRIC_LABELS,
    annotation_uns,
    as_frame,
    finish,
    get_axes,
    strategy_display_name,
    to_str_list,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["strategy_comparison"]

_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr")
#: Test-cell columns of the conformal prediction sets (runs with calibration cells).
_CONFORMAL = ("coverage", "set_size", "set_unknown_share", "ece", "ece_scaled")
#: 1 - the error rate the comparison measures coverage at (scdlkit.foundation._conformal)
_COVERAGE_TARGET = 0.9
_SPLITS = {"test": "test", "validation": "validation", "val": "validation"}


def strategy_metrics_frame(adata: AnnData, key: str) -> tuple[pd.DataFrame, str | None]:
    """``uns[key]["strategy_metrics"]`` with a ``strategy`` column, and the best strategy.

    After a comparison of several models (a ``model`` column), ``strategy`` reads
    ``"<model> · <strategy>"`` (the baseline stays ``"baseline"``), so every row has its name.
    """
    uns = annotation_uns(adata, key, require=("strategy_metrics",))
    frame = as_frame(uns["strategy_metrics"], key, "strategy_metrics")
    if "strategy" not in frame.columns:
        if frame.index.name != "strategy":
            msg = (
                f"adata.uns[{key!r}]['strategy_metrics'] has no 'strategy' column; "
                f"columns: {list(frame.columns)}"
            )
            raise KeyError(msg)
        frame = frame.reset_index()
    if frame.empty:
        msg = f"adata.uns[{key!r}]['strategy_metrics'] has no rows: no strategy was evaluated"
        raise ValueError(msg)
    best = uns.get("best_strategy")
    best = None if best is None else str(best)
    if "model" in frame.columns:  # several models compared: one row per (model, strategy)
        frame = frame.copy()
        frame["strategy"] = [
            strategy if model == "expression" else f"{model} · {strategy}"
            for model, strategy in zip(
                to_str_list(frame["model"].to_numpy()),
                to_str_list(frame["strategy"].to_numpy()),
                strict=True,
            )
        ]
        if best is not None and best != "baseline" and "model" in uns:
            best = f"{uns['model']} · {best}"
    return frame, best


def strategy_comparison(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    metric: str = "macro_f1",
    split: str = "test",
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Compare the adaptation strategies of :func:`scdlkit.tl.adapt_annotation` on one metric.

    One horizontal bar per strategy, in the order they were run, with its value written at the
    end of the bar. The best strategy (``uns[key]["best_strategy"]``) is drawn in a highlight
    colour and marked ``(best)`` in its label; the non-foundation ``baseline`` is drawn grey and
    hatched, with a dotted reference line at its value, so gains over it are easy to judge.
    A metric that is undefined for a strategy (``NaN``, e.g. AUROC on a split missing a class)
    gets an empty bar labelled ``n/a``. Error bars show the noise whenever the metrics hold it:
    with ``n_repeats > 1`` the 95% t interval over repeats, corrected for their shared training
    cells (``<column>_t_ci_low``/``_high``; ``<column>_sd`` where no interval was computed);
    with one repeat the bootstrap 95% interval over the test cells of the one fitted model
    (``<column>_boot_ci_low``/``_high``).

    Parameters
    ----------
    adata
        AnnData annotated by :func:`scdlkit.tl.adapt_annotation`.
    key
        The ``key_added`` of that call; reads ``adata.uns[key]["strategy_metrics"]``.
    metric
        ``"accuracy"``, ``"macro_f1"``, ``"balanced_accuracy"`` or ``"auroc_ovr"``; on the test
        cells of a run with calibration cells also ``"coverage"`` (of the prediction sets at
        error rate 0.1; a dashed line marks the 0.9 target), ``"set_size"``,
        ``"set_unknown_share"``, ``"ece"`` or ``"ece_scaled"``.
    split
        ``"test"`` (held-out cells) or ``"validation"`` (alias ``"val"``; the split the best
        strategy was chosen on).
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
    >>> sck.tl.adapt_annotation(
    ...     adata, "cell_type", strategies=("head", "baseline")
    ... )  # doctest: +SKIP
    >>> sck.pl.strategy_comparison(adata)  # doctest: +SKIP
    >>> sck.pl.strategy_comparison(adata, metric="accuracy", split="validation")  # doctest: +SKIP
    """
    if metric not in _METRICS + _CONFORMAL:
        msg = f"metric={metric!r} is not one of {', '.join(map(repr, _METRICS + _CONFORMAL))}"
        raise ValueError(msg)
    if metric in _CONFORMAL and _SPLITS.get(split) != "test":
        msg = f"metric={metric!r} is measured on the test cells only: pass split='test'"
        raise ValueError(msg)
    if split not in _SPLITS:
        msg = f"split={split!r} is not one of 'test', 'validation' or 'val'"
        raise ValueError(msg)
    prefix = _SPLITS[split]
    frame, best = strategy_metrics_frame(adata, key)
    column = f"{prefix}_{metric}"
    if column not in frame.columns:
        msg = (
            f"adata.uns[{key!r}]['strategy_metrics'] has no column {column!r}; "
            f"columns: {list(frame.columns)}"
        )
        raise KeyError(msg)

    strategies = to_str_list(frame["strategy"].to_numpy())
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    n = len(strategies)

    fig, ax, created = get_axes(ax, figsize=(6.0, 1.2 + 0.45 * n))
    colors = []
    for strategy in strategies:
        if strategy == best:
            colors.append(BEST_COLOR)
        elif strategy == "baseline":
            colors.append(BASELINE_COLOR)
        else:
            colors.append(BAR_COLOR)
    positions = np.arange(n)
    bars = ax.barh(
        positions,
        np.nan_to_num(values, nan=0.0),
        color=colors,
        edgecolor="#4d4d4d",
        linewidth=0.6,
        label=column,
    )
    for strategy, bar in zip(strategies, bars.patches, strict=True):
        if strategy == "baseline":
            bar.set_hatch(BASELINE_HATCH)
    spread = _error_bars(frame, column, values)
    if spread is not None:
        ax.errorbar(
            values,
            positions,
            xerr=spread,
            fmt="none",
            ecolor="#222222",
            elinewidth=1.0,
            capsize=3,
            label=spread_label(frame, column),
        )

    reach = values if spread is None else values + np.nan_to_num(spread[1], nan=0.0)
    upper = max(1.0, float(np.nanmax(reach)) if np.isfinite(reach).any() else 1.0)
    pad = 0.015 * upper
    for pos, value, end in zip(positions, values, reach, strict=True):
        text = "n/a" if not np.isfinite(value) else f"{value:.3f}"
        x = (end if np.isfinite(end) else 0.0) + pad
        ax.text(x, pos, text, va="center", ha="left", fontsize=9)

    if metric == "coverage":
        ax.axvline(_COVERAGE_TARGET, color="#b2182b", linestyle="--", linewidth=1.0, zorder=0)
    if "baseline" in strategies:
        base_value = values[strategies.index("baseline")]
        if np.isfinite(base_value):
            ax.axvline(base_value, color="#4d4d4d", linestyle=":", linewidth=1.0, zorder=0)

    ax.set_yticks(positions, labels=[strategy_display_name(s, best) for s in strategies])
    for label, strategy in zip(ax.get_yticklabels(), strategies, strict=True):
        if strategy == best:
            label.set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)  # first strategy on top
    ax.set_xlim(0.0, upper * 1.18)
    split_name = "validation" if prefix == "validation" else "test"
    ax.set_xlabel(f"{split_name} {METRIC_LABELS[metric]}")
    ax.set_title("Strategy comparison")
    ax.spines[["top", "right"]].set_visible(False)
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)


def _error_bars(frame: pd.DataFrame, column: str, values: np.ndarray) -> np.ndarray | None:
    """``(2, n)`` distances below and above each bar, or ``None`` without noise columns."""
    for kind in ("t", "boot"):
        low, high = f"{column}_{kind}_ci_low", f"{column}_{kind}_ci_high"
        if low in frame.columns and high in frame.columns:
            lo = pd.to_numeric(frame[low], errors="coerce").to_numpy(dtype=float)
            hi = pd.to_numeric(frame[high], errors="coerce").to_numpy(dtype=float)
            return np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)])
    if f"{column}_sd" in frame.columns:
        sd = pd.to_numeric(frame[f"{column}_sd"], errors="coerce").to_numpy(dtype=float)
        return np.vstack([sd, sd])
    return None


def spread_label(frame: pd.DataFrame, column: str) -> str:
    """What the error bars of ``column`` show, for the legend."""
    if f"{column}_t_ci_low" in frame.columns:
        return "95% t interval over repeats (corrected)"
    if f"{column}_boot_ci_low" in frame.columns:
        return "95% bootstrap over test cells (one model)"
    return "± 1 sd over repeats"
