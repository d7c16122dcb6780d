from __future__ import annotations

import os

from anndata import AnnData

from scdlkit._shared.arguments import check_bool, check_choice, check_int, check_optional_int
from scdlkit._shared.provenance import check_writable, package_versions
from scdlkit._shared.slots import Slots, check_key_name
from scdlkit.tl._checks import (
    check_checkpoint,
    check_device,
    check_has_cells,
    check_optional_str,
    check_random_state,
)

__all__ = ["embed"]


def embed(
    adata: AnnData,
    *,
    checkpoint: str | os.PathLike = "whole-human",
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    random_state: int = 42,
    chunk_size: int | None = None,
    progress: bool = True,
    key_added: str = "scgpt",
    copy: bool = False,
) -> AnnData | None:
    """Embed cells with a pretrained foundation model (scGPT or Geneformer; frozen, no training).

    Every argument is checked before any work, and the results are written only once all are
    computed, so a call that fails leaves ``adata`` exactly as it was.

    The checkpoint folder's layout says which model it is (see the Models page). The cell
    embedding is the model's own, L2-normalised per cell:

    - scGPT: the encoder output at the ``<cls>`` position, as in upstream's ``embed_data``.
      Genes are matched to the vocabulary by symbol; each cell's expressed genes are binned by
      rank, so raw counts and log-normalised values give the same result.
    - Geneformer: upstream's ``EmbExtractor`` default (V2: ``<cls>`` of the second-to-last
      layer; V1: the mean over the cell's genes there), from its rank-value tokens. It reads raw
      integer counts only (log-normalised values are refused), Ensembl ids or symbols.

    Parameters
    ----------
    adata
        Cells x genes with raw counts or log-normalised values (non-negative) and gene symbols.
        In memory, with a dask matrix, or backed (``sc.read_h5ad(path, backed="r")``): the
        results then go into its in-memory ``obsm``/``uns``; save them with
        ``adata.write_h5ad(new_path)``, or open with ``backed="r+"`` and call ``adata.write()``.
        A view of a backed AnnData cannot take results and is refused before any work.
    checkpoint
        Official scGPT checkpoint name (found in the local cache), or a checkpoint folder: an
        scGPT one (``args.json``, ``vocab.json``, ``best_model.pt``) or a Geneformer one
        (``config.json``, ``model.safetensors``, its dictionaries).
    gene_key
        Column of ``adata.var`` with gene identifiers (symbols; Ensembl ids for Geneformer too);
        default ``adata.var_names``.
    layer
        Layer holding the values; default ``adata.X``.
    batch_size
        Cells per forward pass (cells of similar length are batched together).
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or a torch device string.
    precision
        ``"auto"`` (bf16 autocast where the hardware runs bf16 natively: recent CUDA GPUs, CPUs
        with AMX or AVX512-BF16; fp32 elsewhere), ``"fp32"`` or ``"bf16"``. The precision used is
        recorded in ``uns[key_added]["params"]["precision_used"]``.
    random_state
        Seeds tie-breaking in binning and gene subsampling above ``max_seq_len``.
    chunk_size
        Cells read, tokenised and embedded at a time. ``None``: all at once for an in-memory
        AnnData, 50,000 for a backed one (``sc.read_h5ad(path, backed="r")``), so memory stays
        bounded by the chunk, not the dataset. Results do not depend on it in fp32 (bf16: see
        "What a cell's result depends on" in the outputs docs). Under a
        ``torch.distributed`` launch (``torchrun --nproc-per-node=N``), each process embeds a
        share of every chunk and all processes receive the results in cell order.
    progress
        Show a progress bar.
    key_added
        Writes ``adata.obsm[f"X_{key_added}"]`` and ``adata.uns[key_added]``: a string without
        ``/``, backslash or NUL (h5ad and zarr refuse them).
    copy
        Return a modified copy instead of writing into ``adata`` (not for a backed AnnData).

    Returns
    -------
    AnnData or None
        ``None``, or the annotated copy when ``copy=True``. Writes:

        - ``obsm[f"X_{key_added}"]``: float32 ``(n_cells, d_model)``, unit-length rows;
        - ``uns[key_added]["params"]``: the arguments and the checkpoint used;
        - ``uns[key_added]["n_genes_matched"]``, ``uns[key_added]["versions"]``.

    Examples
    --------
    >>> sck.tl.embed(adata, checkpoint="path/to/scGPT_human")  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_scgpt")  # doctest: +SKIP
    """
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import embed_cells

    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    check_has_cells(adata, "embed")
    checkpoint = check_checkpoint("checkpoint", checkpoint)
    gene_key = check_optional_str("gene_key", gene_key)
    layer = check_optional_str("layer", layer)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    device = check_device(device)
    precision = check_choice("precision", precision, ("auto", "fp32", "bf16"))
    random_state = check_random_state(random_state)
    chunk_size = check_optional_int("chunk_size", chunk_size, min_value=1)
    progress = check_bool("progress", progress)
    key_added = check_key_name("key_added", key_added)
    result = embed_cells(
        adata,
        checkpoint=checkpoint,
        gene_key=gene_key,
        layer=layer,
        batch_size=batch_size,
        device=device,
        precision=precision,
        random_state=random_state,
        chunk_size=chunk_size,
        progress=progress,
    )
    ckpt = result.checkpoint
    slots = Slots(
        obsm={f"X_{key_added}": result.embeddings},
        uns={
            key_added: {
                "params": {
                    "model": ckpt.model_name,
                    "checkpoint": str(ckpt.name),
                    "checkpoint_path": str(ckpt.path),
                    "gene_key": gene_key or "",
                    "layer": layer or "",
                    "batch_size": batch_size,
                    "device": result.device,
                    "precision": precision,
                    "precision_used": result.precision_used,
                    "random_state": random_state,
                },
                "n_genes_matched": result.n_genes_matched,
                "versions": package_versions(),
            }
        },
    )
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None
