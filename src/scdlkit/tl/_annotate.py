from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from anndata import AnnData

from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import check_key_added, write_annotation_slots

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
        A fitted :class:`scdlkit.AnnotationRunner`, the folder it was saved to, or the
        reference's record ``ref.uns["scgpt_annotation"]``: then the folder it names is loaded
        and refused if its manifest's sha256 differs from the one recorded (the folder was
        overwritten or edited since), so the labels always come from the model the record
        describes.
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
    check_key_added(adata, key_added)
    expected = None
    if isinstance(runner, Mapping):
        runner, expected = _recorded_runner(runner)
    if not isinstance(runner, ScGPTAnnotationRunner):
        runner = ScGPTAnnotationRunner.load(runner, checkpoint=checkpoint, device=device)
    if expected is not None and runner.manifest_sha256_ != expected:
        msg = (
            f"the runner folder {str(runner.runner_dir_)!r} changed since the record was written: "
            f"its manifest has sha256 {runner.manifest_sha256_}, the record says {expected}. "
            "It now holds another model; use the folder the record was made with (or pass the "
            "folder itself to accept the new model)."
        )
        raise ValueError(msg)
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


def _recorded_runner(record: Mapping[str, Any]) -> tuple[str, str]:
    """The folder and manifest sha256 of an ``uns`` record written by scdlkit."""
    folder, digest = record.get("runner_dir"), record.get("runner_manifest_sha256")
    if not isinstance(folder, str) or not isinstance(digest, str) or len(digest) != 64:
        msg = (
            "runner= is a mapping but not an scdlkit record with 'runner_dir' and "
            "'runner_manifest_sha256' (written by sck.tl.adapt_annotation or sck.tl.annotate "
            "from this version on); pass the runner folder or a loaded AnnotationRunner instead."
        )
        raise ValueError(msg)
    return folder, digest
