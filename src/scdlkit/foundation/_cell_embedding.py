"""Cell embeddings of a pretrained encoder for any registered model (what ``tl.embed`` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scdlkit.foundation._device import resolve_device, resolve_precision
from scdlkit.foundation._embed import l2_normalise
from scdlkit.foundation._stream import encode_adata
from scdlkit.foundation.models import load_encoder, model_card, resolve_model_checkpoint

__all__ = ["CellEmbeddings", "embed_cells"]


@dataclass(frozen=True)
class CellEmbeddings:
    """What :func:`embed_cells` computed.

    Attributes
    ----------
    embeddings
        ``(n_cells, d_model)`` float32, unit-length rows, in cell order.
    checkpoint
        The resolved checkpoint (``model_name`` says which model).
    n_genes_matched
        Genes of the AnnData the model could read.
    device, precision_used
        Where it ran and in which precision (``"fp32"`` or ``"bf16"``).
    """

    embeddings: np.ndarray
    checkpoint: Any
    n_genes_matched: int
    device: str
    precision_used: str


def embed_cells(
    adata: Any,
    *,
    checkpoint: Any = "whole-human",
    model: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    precision: str = "auto",
    random_state: int = 42,
    chunk_size: int | None = None,
    progress: bool = False,
) -> CellEmbeddings:
    """Embed every cell of ``adata`` with a pretrained encoder, frozen; nothing is written.

    The model comes from the checkpoint folder's layout (or ``model=``); its cell embedding is
    the encoder's own (scGPT: the ``<cls>`` output; Geneformer: its default mode and layer),
    L2-normalised per cell. Gene identifiers are checked before the weights are read.

    Parameters
    ----------
    adata
        Cells x genes, in memory, backed or with a dask matrix.
    checkpoint, model
        A checkpoint folder or official name, and optionally the registered model's name.
    gene_key, layer, batch_size, device, precision, random_state, chunk_size, progress
        As for :func:`scdlkit.tl.embed`.

    Returns
    -------
    CellEmbeddings
    """
    ckpt = resolve_model_checkpoint(checkpoint, model=model)
    card = model_card(ckpt)
    card.check_gene_overlap(card.match_genes(adata, ckpt, gene_key), gene_key=gene_key)
    torch_device = resolve_device(device)
    precision_used = resolve_precision(precision, torch_device)
    encoder = load_encoder(ckpt, device=torch_device)
    raw, match = encode_adata(
        adata,
        ckpt,
        lambda b: encoder.cell_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
        device=torch_device,
        gene_key=gene_key,
        layer=layer,
        batch_size=batch_size,
        precision=precision,
        seed=random_state,
        chunk_size=chunk_size,
        progress=progress,
    )
    return CellEmbeddings(
        embeddings=l2_normalise(raw),
        checkpoint=ckpt,
        n_genes_matched=match.n_matched,
        device=str(torch_device),
        precision_used=precision_used,
    )
