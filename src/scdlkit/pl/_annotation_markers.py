from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from scdlkit.pl._utils import finish

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["annotation_markers", "marker_genes"]


def marker_genes(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    n_genes: int = 5,
    labels: Sequence[str] | None = None,
    available: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """``{label: top genes}`` from ``uns[f"{key}_markers"]``, each gene listed once (first label
    that ranks it), keeping only genes in ``available`` when given."""
    slot = f"{key}_markers"
    if slot not in adata.uns:
        msg = (
            f"adata.uns[{slot!r}] not found: run sck.tl.annotation_markers(adata, key={key!r}) "
            "first."
        )
        raise KeyError(msg)
    markers = adata.uns[slot]
    if not isinstance(markers, pd.DataFrame):
        markers = pd.DataFrame(dict(markers))
    order = list(dict.fromkeys(markers["label"].astype(str)))
    if labels is not None:
        missing = [label for label in labels if label not in order]
        if missing:
            msg = f"no markers for label(s) {missing}; labels with markers: {order}."
            raise ValueError(msg)
        order = list(labels)
    keep = None if available is None else set(map(str, available))
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for label in order:
        rows = markers[markers["label"].astype(str) == label].sort_values("rank")
        genes = [g for g in rows["gene"].astype(str) if keep is None or g in keep]
        genes = [g for g in genes if g not in seen][:n_genes]
        seen.update(genes)
        if genes:
            out[label] = genes
    return out


def annotation_markers(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    n_genes: int = 5,
    labels: Sequence[str] | None = None,
    groupby: str | None = None,
    use_raw: bool | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Figure | None:
    """scanpy's dot plot of the genes behind each predicted label, by predicted label.

    Reads ``uns[f"{key}_markers"]`` (from :func:`scdlkit.tl.annotation_markers`); genes are
    grouped under the label they explain, cells by ``obs[groupby]`` (default the predicted
    labels). Dot size: the share of the group's cells expressing the gene; colour: its mean
    expression (:func:`scanpy.pl.dotplot`).

    Parameters
    ----------
    adata
        AnnData with the markers and the expression (``X``, or ``raw`` with ``use_raw``).
    key
        The ``key_added`` of the annotation.
    n_genes
        Genes per label (the highest ranked found in ``adata``).
    labels
        Labels to show (default: every label with markers, in the order of the markers).
    groupby
        ``obs`` column grouping the cells; default ``key``.
    use_raw
        Read the expression from ``adata.raw`` (default: when it exists), else from ``X``.
    ax
        Axes to draw into; a new figure is created when ``None``.
    show
        Show the figure. ``None``: show it when it is not returned and matplotlib is
        interactive (as in a notebook).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.
    save
        Path to save the figure to (format from the file extension).
    **kwargs
        Further arguments of :func:`scanpy.pl.dotplot` (``standard_scale``, ``cmap``, ...).

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.

    Examples
    --------
    >>> sck.tl.annotation_markers(query)  # doctest: +SKIP
    >>> sck.pl.annotation_markers(query, n_genes=3)  # doctest: +SKIP
    """
    # scanpy's plotting is imported here: `import scdlkit.pl` stays light
    import scanpy as sc
    from anndata import AnnData

    groupby = key if groupby is None else groupby
    if groupby not in adata.obs.columns:
        msg = f"groupby={groupby!r} is not a column of adata.obs."
        raise KeyError(msg)
    raw = adata.raw is not None if use_raw is None else use_raw
    names = adata.raw.var_names if raw else adata.var_names
    genes = marker_genes(adata, key=key, n_genes=n_genes, labels=labels, available=names)
    if not genes:
        msg = f"none of the marker genes of adata.uns['{key}_markers'] are in adata's genes."
        raise ValueError(msg)
    # a small AnnData of the plotted genes, without the categories no cell has (classes no query
    # cell was given), on which scanpy's dot plot fails
    flat = [g for group in genes.values() for g in group]
    matrix = (adata.raw if raw else adata)[:, flat].X
    groups = adata.obs[groupby]
    if isinstance(groups.dtype, pd.CategoricalDtype):
        groups = groups.cat.remove_unused_categories()
    plotted = AnnData(
        matrix,
        obs=pd.DataFrame({groupby: groups.values}, index=adata.obs_names),
        var=pd.DataFrame(index=flat),
    )
    plot = sc.pl.dotplot(
        plotted,
        genes,
        groupby,
        use_raw=False,
        ax=ax,
        show=False,
        return_fig=True,
        **kwargs,
    )
    plot.make_figure()
    fig = plot.fig
    return finish(fig, created=ax is None, show=show, return_fig=return_fig, save=save)
