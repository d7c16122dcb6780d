"""Shared helpers of the plots: reading what ``sck.tl.adapt_annotation`` wrote, figure handling."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scdlkit._shared.strategies import STRATEGIES

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "BASELINE_COLOR",
    "BASELINE_HATCH",
    "BAR_COLOR",
    "BEST_COLOR",
    "METRIC_LABELS",
    "annotation_uns",
    "as_frame",
    "check_not_a_query",
    "finish",
    "get_axes",
    "label_categories",
    "missing_slot_error",
    "strategy_colors",
    "strategy_display_name",
    "to_str_list",
]

#: Colour of an ordinary strategy's bar in :func:`scdlkit.pl.strategy_comparison`.
BAR_COLOR = "#4C72B0"
#: Colour of the best strategy (``uns[key]["best_strategy"]``).
BEST_COLOR = "#DD8452"
#: Neutral colour and hatch of the non-foundation ``baseline`` strategy.
BASELINE_COLOR = "#A8A8A8"
BASELINE_HATCH = "//"

METRIC_LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "balanced_accuracy": "balanced accuracy",
    "auroc_ovr": "AUROC (one-vs-rest)",
    "loss": "loss",
    "lr": "learning rate",
    "seconds": "seconds per epoch",
    "coverage": "coverage of the 90% prediction sets",
    "set_size": "mean prediction-set size (90%)",
    "set_unknown_share": "share without a single-class set (90%)",
    "ece": "expected calibration error",
    "ece_scaled": "expected calibration error, temperature-scaled",
}

# A fixed colour per known strategy, so a strategy keeps its colour across plots.
_STRATEGY_ORDER = STRATEGIES

_TOOL_HINT = "run sck.tl.adapt_annotation(adata, label_key, key_added={key!r}) first"
_QUERY_HINT = (
    "run sck.tl.adapt_annotation(adata, label_key, key_added={key!r}) on a labelled reference, "
    "or sck.tl.annotate(adata, runner, key_added={key!r}) on a query, first"
)


def missing_slot_error(key: str, slot: str, *, extra: str = "", query_ok: bool = False) -> KeyError:
    """A ``KeyError`` naming the missing slot, the key and the tool that writes it.

    ``query_ok``: the plot also reads what :func:`scdlkit.tl.annotate` writes on a query, so
    the hint names both tools.
    """
    hint = _QUERY_HINT if query_ok else _TOOL_HINT
    msg = f"{slot} not found: {hint.format(key=key)}"
    if extra:
        msg = f"{msg} ({extra})"
    return KeyError(msg)


def annotation_uns(
    adata: AnnData, key: str, *, require: Sequence[str] = (), query_ok: bool = False
) -> Mapping[str, Any]:
    """Return ``adata.uns[key]``, checking it holds what ``adapt_annotation`` writes.

    ``query_ok``: what :func:`scdlkit.tl.annotate` writes on a query is enough.
    """
    if key not in adata.uns:
        found = [
            k for k, v in adata.uns.items() if isinstance(v, Mapping) and "strategy_metrics" in v
        ]
        extra = (
            f"annotation results found under key(s): {', '.join(map(repr, found))}" if found else ""
        )
        raise missing_slot_error(key, f"adata.uns[{key!r}]", extra=extra, query_ok=query_ok)
    uns = adata.uns[key]
    if not isinstance(uns, Mapping):
        msg = (
            f"adata.uns[{key!r}] is a {type(uns).__name__}, not the result dict of "
            f"sck.tl.adapt_annotation: {_TOOL_HINT.format(key=key)}"
        )
        raise TypeError(msg)
    for name in require:
        if name not in uns:
            check_not_a_query(uns, key, name)
            raise missing_slot_error(key, f"adata.uns[{key!r}][{name!r}]")
    return uns


def check_not_a_query(uns: Mapping[str, Any], key: str, name: str) -> None:
    """Say so when ``uns[key]`` lacks ``name`` because :func:`scdlkit.tl.annotate` wrote it."""
    params = uns.get("params")
    by_annotate = hasattr(params, "get") and "query_layer" in params
    if by_annotate and "strategy_metrics" not in uns:
        msg = (
            f"adata.uns[{key!r}][{name!r}] not found: this AnnData was labelled by "
            "sck.tl.annotate (a query), which fits nothing; the strategies' metrics and "
            "training curves belong to the reference: plot the AnnData that "
            "sck.tl.adapt_annotation annotated."
        )
        raise KeyError(msg)


def to_str_list(values: Any) -> list[str]:
    """Lists come back from ``read_h5ad`` as numpy arrays: accept both, return ``list[str]``."""
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return [str(v) for v in np.asarray(values, dtype=object).ravel().tolist()]


def label_categories(uns: Mapping[str, Any], key: str) -> list[str]:
    if "label_categories" not in uns:
        raise missing_slot_error(key, f"adata.uns[{key!r}]['label_categories']")
    return to_str_list(uns["label_categories"])


def strategy_display_name(strategy: str, best: str | None) -> str:
    return f"{strategy} (best)" if best is not None and strategy == best else strategy


def strategy_colors(strategies: Sequence[str]) -> dict[str, Any]:
    """A stable colour per strategy (known names keep theirs; ``baseline`` is grey)."""
    palette = list(mpl.colormaps["tab10"].colors)
    palette = [c for i, c in enumerate(palette) if i != 7]  # tab10's grey is the baseline's
    colors: dict[str, Any] = {}
    extra = 0
    for strategy in strategies:
        if strategy == "baseline":
            colors[strategy] = BASELINE_COLOR
        elif strategy in _STRATEGY_ORDER:
            colors[strategy] = palette[_STRATEGY_ORDER.index(strategy) % len(palette)]
        else:
            colors[strategy] = palette[(len(_STRATEGY_ORDER) + extra) % len(palette)]
            extra += 1
    return colors


def as_frame(value: Any, key: str, slot: str) -> pd.DataFrame:
    """A DataFrame from ``uns`` (stays a DataFrame through h5ad; also accept dict-of-columns)."""
    if isinstance(value, pd.DataFrame):
        return value
    if isinstance(value, Mapping):
        try:
            return pd.DataFrame(dict(value))
        except ValueError:
            pass
    msg = (
        f"adata.uns[{key!r}][{slot!r}] is a {type(value).__name__}, expected a DataFrame as "
        f"written by sck.tl.adapt_annotation"
    )
    raise TypeError(msg)


def get_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes, bool]:
    """The figure and axes to draw into, and whether the figure was created here."""
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax, True


def finish(
    fig: Figure,
    *,
    created: bool,
    show: bool | None,
    return_fig: bool,
    save: str | os.PathLike | None,
) -> Figure | None:
    """Save, show and/or return the figure, the way ``sc.pl`` does.

    ``show=None`` shows the figure only when it is not returned and matplotlib is in interactive
    mode (as in a notebook). A figure created here and saved to ``save`` without being shown or
    returned is closed, so scripts that save many plots do not accumulate open figures.
    """
    if save is not None:
        fig.savefig(os.fspath(save), bbox_inches="tight")
    if show is None:
        show = not return_fig and mpl.is_interactive()
    if show:
        plt.show()
    if return_fig:
        return fig
    if created and save is not None and not show:
        plt.close(fig)
    return None
