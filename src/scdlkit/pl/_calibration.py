from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdlkit.pl._strategy_comparison import strategy_metrics_frame
from scdlkit.pl._utils import (
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

__all__ = ["calibration"]

_REQUIRED = ("strategy", "scaled", "confidence", "accuracy", "n_cells")


def calibration(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    scaled: bool = False,
    strategies: list[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
) -> Figure | None:
    """Reliability diagram of every strategy on the test cells of ``sck.tl.adapt_annotation``.

    For each strategy, test cells are binned by their top probability (15 equal-width bins);
    each point is a bin's mean top probability against the share of its cells whose most probable
    class is right (marker area: its cells). A calibrated model lies on the dashed diagonal;
    below it, the model is overconfident. The legend gives each strategy's expected calibration
    error (``test_ece``, or ``test_ece_scaled`` after temperature scaling).

    Parameters
    ----------
    adata
        AnnData annotated by :func:`scdlkit.tl.adapt_annotation` with calibration cells
        (``calibration_size > 0``, the default).
    key
        The ``key_added`` of that call; reads ``adata.uns[key]["calibration_curve"]`` and
        ``["strategy_metrics"]``.
    scaled
        Show the probabilities after temperature scaling (fitted on the calibration cells).
    strategies
        Strategies to draw (default: all).
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
    >>> sck.tl.adapt_annotation(adata, "cell_type")  # doctest: +SKIP
    >>> sck.pl.calibration(adata, scaled=True)  # doctest: +SKIP
    """
    uns = annotation_uns(adata, key)
    if "calibration_curve" not in uns:
        check_not_a_query(uns, key, "calibration")
        msg = (
            f"adata.uns[{key!r}]['calibration_curve'] not found: it is written by "
            f"sck.tl.adapt_annotation(adata, label_key, key_added={key!r}) when there are "
            "calibration cells (calibration_size > 0, the default) and test cells"
        )
        raise KeyError(msg)
    frame = as_frame(uns["calibration_curve"], key, "calibration_curve")
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        msg = f"adata.uns[{key!r}]['calibration_curve'] lacks column(s) {missing}"
        raise KeyError(msg)
    frame = frame[frame["scaled"].astype(bool) == bool(scaled)]
    present = list(dict.fromkeys(frame["strategy"].astype(str)))
    if strategies is not None:
        unknown = [s for s in strategies if s not in present]
        if unknown:
            msg = f"strategies {unknown} have no calibration curve; choose among {present}"
            raise ValueError(msg)
        present = list(strategies)
    metrics, best = strategy_metrics_frame(adata, key)
    column = "test_ece_scaled" if scaled else "test_ece"
    ece = (
        dict(zip(to_str_list(metrics["strategy"]), pd.to_numeric(metrics[column]), strict=True))
        if column in metrics.columns
        else {}
    )
    fig, ax, created = get_axes(ax, figsize=(5.6, 4.6))
    colors = strategy_colors(present)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#7f7f7f", linewidth=1, label="calibrated")
    total = max(float(frame["n_cells"].max()), 1.0) if len(frame) else 1.0
    for strategy in present:
        rows = frame[frame["strategy"].astype(str) == strategy].sort_values("confidence")
        label = strategy_display_name(strategy, best)
        if strategy in ece and np.isfinite(ece[strategy]):
            label += f" (ECE {ece[strategy]:.3f})"
        ax.plot(
            rows["confidence"],
            rows["accuracy"],
            color=colors[strategy],
            linewidth=1.2,
            marker=None,
            label=label,
        )
        ax.scatter(
            rows["confidence"],
            rows["accuracy"],
            s=12 + 120 * pd.to_numeric(rows["n_cells"]).to_numpy(dtype=float) / total,
            color=colors[strategy],
            edgecolor="white",
            linewidth=0.5,
            zorder=3,
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("top probability (bin mean)")
    ax.set_ylabel("accuracy of the top label")
    ax.set_title("Reliability on test cells" + (" (temperature-scaled)" if scaled else ""))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return finish(fig, created=created, show=show, return_fig=return_fig, save=save)
