"""Matching the AnnData's genes to the scGPT vocabulary, and tokenising it once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scdlkit._shared.validation import (
    gene_names,
    get_matrix,
    looks_like_ensembl,
    validate_values,
)
from scdlkit.foundation.models._gene_match import MatchCounts
from scdlkit.foundation.models.scgpt._checkpoint import ScGPTCheckpoint
from scdlkit.foundation.models.scgpt._tokenize import ScGPTTokens, tokenize_matrix

__all__ = ["GeneMatch", "match_genes", "tokenize_adata"]

logger = logging.getLogger("scdlkit")


@dataclass(frozen=True)
class GeneMatch(MatchCounts):
    """Which of the AnnData's genes the vocabulary knows.

    Attributes
    ----------
    names
        The gene symbols that were matched against the vocabulary, one per ``var``.
    vocab_ids
        Vocabulary id per ``var``, -1 where the vocabulary lacks the gene.
    """

    names: pd.Index
    vocab_ids: np.ndarray


def match_genes(adata: Any, checkpoint: ScGPTCheckpoint, gene_key: str | None) -> GeneMatch:
    """Look each gene symbol up in the vocabulary (special tokens never match).

    Parameters
    ----------
    adata
        Cells x genes.
    checkpoint
        The resolved checkpoint (its vocabulary is read).
    gene_key
        ``adata.var`` column with gene symbols; ``None`` uses ``var_names``.

    Returns
    -------
    GeneMatch
        Vocabulary id per gene (-1 where absent), with matched/unmatched lists and the ratio.

    Examples
    --------
    >>> match = match_genes(adata, resolve_checkpoint("whole-human"), None)  # doctest: +SKIP
    >>> match.n_matched, match.unmatched[:5]  # doctest: +SKIP
    """
    names = gene_names(adata, gene_key)
    vocab = checkpoint.vocab
    specials = {checkpoint.args.pad_token, "<cls>", "<eoc>"}
    ids = np.array([-1 if n in specials else vocab.get(n, -1) for n in names], dtype=np.int64)
    return GeneMatch(names=names, vocab_ids=ids)


def check_gene_overlap(
    match: GeneMatch, *, gene_key: str | None, min_gene_overlap: int | float = 1
) -> None:
    """Refuse data whose genes the vocabulary does not know, naming ``gene_key`` where it helps.

    ``min_gene_overlap`` is a count of genes (int) or a fraction of the input genes (float < 1).
    """
    if gene_key is None and looks_like_ensembl(match.names) and match.ratio < 0.5:
        msg = (
            "var_names look like Ensembl ids, but the scGPT vocabulary holds gene symbols. Pass "
            "gene_key= naming the adata.var column with symbols (e.g. gene_key='feature_name' or "
            "'gene_symbols')."
        )
        raise ValueError(msg)
    needed = (
        min_gene_overlap * len(match.names)
        if isinstance(min_gene_overlap, float) and min_gene_overlap < 1
        else min_gene_overlap
    )
    if match.n_matched == 0 or match.n_matched < needed:
        where = f"adata.var[{gene_key!r}]" if gene_key else "adata.var_names"
        sample = ", ".join(map(str, match.names[:5]))
        msg = (
            f"only {match.n_matched} of {len(match.names)} genes in {where} are in the scGPT "
            f"vocabulary (need at least {needed:g}; first genes: {sample}). Use human gene "
            "symbols, or pass gene_key= naming the adata.var column that holds them."
        )
        raise ValueError(msg)


def tokenize_adata(
    adata: Any,
    checkpoint: ScGPTCheckpoint,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    min_gene_overlap: int | float = 1,
    seed: int = 0,
    rows: slice | None = None,
    check_values: bool = True,
    progress: bool = False,
    match: GeneMatch | None = None,
) -> tuple[ScGPTTokens, GeneMatch]:
    """Validate values and genes, then tokenise every cell once.

    Raises before any work on negative/non-finite values, too little gene overlap or Ensembl ids
    without ``gene_key``; the AnnData is never modified. ``rows`` tokenises a contiguous range of
    cells only (streaming over a backed AnnData), with the tokens the whole dataset would give
    them; ``check_values=False`` skips the value check (done once before streaming).

    Parameters
    ----------
    adata
        Cells x genes; raw counts or log-normalised values (non-negative), gene symbols. In
        memory, dask or backed.
    checkpoint
        The resolved checkpoint: its vocabulary, special-token ids, ``n_bins``, ``pad_value`` and
        ``max_seq_len`` shape the tokens.
    gene_key
        ``adata.var`` column with gene symbols; ``None`` uses ``var_names``.
    layer
        Layer holding the values; ``None`` uses ``adata.X``.
    min_gene_overlap
        Least number of genes (int), or fraction of the input genes (float below 1), that must be
        in the vocabulary; at least one gene must match in any case.
    seed
        Seeds tie-breaking in binning and gene subsampling above ``max_seq_len``.
    rows
        Contiguous range of cells to tokenise; ``None`` for all cells.
    check_values
        Check for negative or non-finite values first.
    progress
        Show a progress bar while tokenising.
    match
        The gene match of this AnnData when already made (by the preflight, or for an earlier
        slice of rows); ``None`` matches the genes here.

    Returns
    -------
    tokens : ScGPTTokens
        Tokens of the cells in ``rows``.
    match : GeneMatch
        Vocabulary id of every gene of the AnnData.

    Raises
    ------
    KeyError
        ``gene_key`` or ``layer`` not found.
    ValueError
        Negative or non-finite values, too little gene overlap, Ensembl ids without ``gene_key``,
        or an empty ``adata.X`` without ``layer``.

    Examples
    --------
    >>> ckpt = sck.foundation.resolve_checkpoint("whole-human")  # doctest: +SKIP
    >>> tokens, match = sck.foundation.tokenize_adata(adata, ckpt)  # doctest: +SKIP
    >>> tokens.n_cells, match.n_matched  # doctest: +SKIP
    """
    if match is None:
        match = match_genes(adata, checkpoint, gene_key)
    check_gene_overlap(match, gene_key=gene_key, min_gene_overlap=min_gene_overlap)
    if check_values:
        validate_values(adata, layer)
    args = checkpoint.args
    matrix = get_matrix(adata, layer)
    rows = slice(0, matrix.shape[0]) if rows is None else rows
    tokens = tokenize_matrix(
        matrix[rows] if (rows.start, rows.stop) != (0, matrix.shape[0]) else matrix,
        match.vocab_ids,
        n_bins=args.n_bins,
        cls_id=checkpoint.cls_id,
        pad_id=checkpoint.pad_id,
        pad_value=args.pad_value,
        max_seq_len=args.max_seq_len,
        seed=seed,
        progress=progress,
    )
    logger.info(
        "tokenised %d cells: %d of %d genes matched the vocabulary, median %d tokens per cell",
        tokens.n_cells,
        match.n_matched,
        len(match.names),
        int(np.median(tokens.lengths)) if tokens.n_cells else 0,
    )
    return tokens, match
