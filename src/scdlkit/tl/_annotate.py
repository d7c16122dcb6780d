from __future__ import annotations

import os
from typing import Any

import numpy as np
from anndata import AnnData

from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import write_annotation_slots

__all__ = ["annotate"]


def annotate(
    adata: AnnData,
    runner: str | os.PathLike | Any,
    *,
    checkpoint: str | os.PathLike | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    chunk_size: int | None = None,
    key_added: str = "scgpt_annotation",
    copy: bool = False,
) -> AnnData | None:
    """Label new cells with a fitted annotation runner.

    Parameters
    ----------
    adata
        Query cells with gene symbols (raw counts or log-normalised). A backed AnnData is read in
        chunks and takes the results in memory, as in :func:`scdlkit.tl.embed`.
    runner
        A fitted :class:`scdlkit.AnnotationRunner`, or the folder it was saved to (e.g.
        ``ref.uns["scgpt_annotation"]["runner_dir"]``).
    checkpoint
        Base checkpoint when loading from a folder (default: the one recorded at save time).
    gene_key, layer
        Where the query's gene symbols and values are (default: as for the reference).
    device
        Where to run when loading from a folder.
    chunk_size
        Cells read, tokenised and labelled at a time (default: all of an in-memory AnnData,
        50,000 of a backed one). Results do not depend on it.
    key_added
        Prefix of the written slots.
    copy
        Return a modified copy instead of writing into ``adata`` (not for a backed AnnData).

    Returns
    -------
    AnnData or None
        ``None``, or the annotated copy when ``copy=True``. Writes ``obs[key_added]``,
        ``obs[f"{key_added}_confidence"]``, ``obs[f"{key_added}_split"]`` (``"query"``),
        ``obsm[f"X_{key_added}"]`` and ``uns[key_added]`` (``best_strategy``, ``label_categories``,
        ``runner_dir``, ``params``, ``versions``).

    Examples
    --------
    >>> sck.tl.annotate(query, ref.uns["scgpt_annotation"]["runner_dir"])  # doctest: +SKIP
    >>> query.obs["scgpt_annotation"].value_counts()  # doctest: +SKIP
    """
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import ScGPTAnnotationRunner

    check_writable(adata, copy=copy)
    if not isinstance(runner, ScGPTAnnotationRunner):
        runner = ScGPTAnnotationRunner.load(runner, checkpoint=checkpoint, device=device)
    predictions = runner.predict(adata, gene_key=gene_key, layer=layer, chunk_size=chunk_size)
    if copy:
        adata = adata.copy()
    write_annotation_slots(
        adata,
        runner,
        predictions,
        key_added=key_added,
        split=np.full(adata.n_obs, "query", dtype=object),
        uns={"params": {**runner.params(), "query_gene_key": gene_key, "query_layer": layer}},
    )
    return adata if copy else None
