from __future__ import annotations

import os

from anndata import AnnData

from scdlkit._shared.arguments import check_bool
from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import Slots, check_key_name
from scdlkit.tl._checks import check_checkpoint, check_optional_str

__all__ = ["inspect"]


def inspect(
    adata: AnnData,
    label_key: str | None = None,
    *,
    checkpoint: str | os.PathLike = "whole-human",
    gene_key: str | None = None,
    layer: str | None = None,
    batch_key: str | None = None,
    key_added: str = "scgpt_inspect",
    copy: bool = False,
) -> AnnData | None:
    """Preflight an AnnData for scGPT: gene overlap, labels, values, sequence lengths.

    Reads only the checkpoint's ``vocab.json`` and ``args.json``. Data problems are reported (with
    a fix for each) rather than raised, so one call shows everything; the report is also logged.

    Parameters
    ----------
    adata
        Cells x genes with gene symbols.
    label_key
        ``adata.obs`` column with cell types; ``None`` checks genes and values only.
    checkpoint
        Official checkpoint name or a checkpoint folder.
    gene_key
        ``adata.var`` column with gene symbols; default ``var_names``.
    layer
        Layer holding the values; default ``adata.X``.
    batch_key
        ``adata.obs`` column with batches/donors: reports cells and classes per batch and warns
        about classes present in one batch only.
    key_added
        Writes the report to ``adata.uns[key_added]`` (a string without ``/``, backslash or
        NUL: h5ad and zarr refuse them).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
        ``None``, or the copy when ``copy=True``. ``adata.uns[key_added]`` holds the report of
        :func:`scdlkit.inspect_annotation_data` as a plain dict (``ok``, ``problems``, ``warnings``,
        ``n_genes_matched``, ``label_categories``, ``label_counts``, ...).

    Examples
    --------
    >>> sck.tl.inspect(adata, "cell_type", checkpoint="path/to/scGPT_human")  # doctest: +SKIP
    >>> adata.uns["scgpt_inspect"]["problems"]  # doctest: +SKIP
    """
    import logging

    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import inspect_annotation_data

    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    label_key = check_optional_str("label_key", label_key)
    checkpoint = check_checkpoint("checkpoint", checkpoint)
    gene_key = check_optional_str("gene_key", gene_key)
    layer = check_optional_str("layer", layer)
    batch_key = check_optional_str("batch_key", batch_key)
    key_added = check_key_name("key_added", key_added)
    report = inspect_annotation_data(
        adata,
        label_key=label_key,
        checkpoint=checkpoint,
        gene_key=gene_key,
        layer=layer,
        batch_key=batch_key,
    )
    logging.getLogger("scdlkit").info("%r", report)
    slots = Slots(uns={key_added: report.to_dict()})
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None
