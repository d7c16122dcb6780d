"""From an expression matrix to scGPT tokens, stored compactly, and from tokens to padded batches.

Tokens of the whole dataset are held CSR-like: per cell, the vocabulary ids (int32) and bins
(uint8) of its expressed, vocabulary-matched genes. That is 5 bytes per non-zero, never a dense
padded array. ``<cls>`` is prepended and padding added only when a batch is built.

Conventions (SCGPT_NOTES.md sections 3-4, the official embedding path ``cell_emb.py``):
``<cls>`` first with value ``pad_value`` (-2); values binned per cell into 1..n_bins-1 by rank;
ties broken at random, and above ``max_seq_len`` a random subset of genes is kept.

A cell's tokens depend on its content alone: its genes are stored in vocabulary-id order, and
every random draw is seeded by ``random_state`` and a hash of the cell's own vocabulary ids and
values (:func:`cell_seed`), never by its row, its neighbours or the column order. So a subset, a
reordered or concatenated AnnData, a chunked or sharded pass give every cell the same tokens.
Where no tie spans several bins (upstream's random draw cannot matter) the tokens equal
upstream's.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scdlkit._shared.progress import tqdm
from scdlkit._shared.validation import iter_row_chunks
from scdlkit.foundation.models._tokens import concat_stores

__all__ = [
    "ScGPTTokens",
    "bin_values",
    "cell_seed",
    "collate_tokens",
    "tokenize_matrix",
]


@functools.cache
def _quantile_levels(n_bins: int) -> np.ndarray:
    levels = np.linspace(0, 1, n_bins - 1)
    levels.flags.writeable = False
    return levels


def cell_seed(random_state: int, gene_ids: np.ndarray, values: np.ndarray) -> list[int]:
    """Seed of a cell's random draws: ``random_state`` plus a hash of its ids and values.

    ``gene_ids`` and ``values`` are hashed in the order given (callers pass vocabulary-id order)
    as little-endian int32 and float32 (the precision tokens are computed at), so the seed does
    not depend on the stored dtypes, the platform, the cell's row or the AnnData's column order.

    Parameters
    ----------
    random_state
        Non-negative seed shared by all cells.
    gene_ids
        Vocabulary ids of the cell's expressed genes.
    values
        Their values (expression, or bins).

    Returns
    -------
    list of int
        Entropy for :func:`numpy.random.default_rng`.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(gene_ids, dtype="<i4").tobytes())
    digest.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    words = np.frombuffer(digest.digest(), dtype="<u8")
    return [int(random_state), *map(int, words)]


def bin_values(values: np.ndarray, n_bins: int, seed: Sequence[int] | None = None) -> np.ndarray:
    """Bin one cell's non-zero values into ``1..n_bins-1`` exactly as upstream ``binning``.

    Edges are the ``n_bins - 1`` quantiles of the values; a value gets ``digitize(v, edges)``;
    where several edges are equal (tied values) the value is spread over the bins they span using
    a generator seeded with ``seed`` (upstream uses the unseeded global generator there), one
    draw per value in the order given.
    """
    edges = np.quantile(values, _quantile_levels(n_bins))
    # quantiles never decrease, and for non-decreasing edges ``digitize(v, edges)`` is exactly
    # ``searchsorted(edges, v, "right")`` (and ``right=True`` is "left"), minus its checks
    left = np.searchsorted(edges, values, side="right")
    right = np.searchsorted(edges, values, side="left")
    if not (left - right > 1).any():
        # no tie spans several bins: upstream's random draw cannot change the result.
        return left
    u = np.random.default_rng(seed).random(len(values))
    return np.ceil(u * (right - left) + left).astype(np.int64)


@dataclass
class ScGPTTokens:
    """Tokens of a set of cells, CSR-like.

    Attributes
    ----------
    indptr
        ``(n_cells + 1,)`` int64 offsets into ``gene_ids`` and ``bins``.
    gene_ids
        Vocabulary id of each expressed, matched gene (int32), in vocabulary-id order per cell.
    bins
        Its expression bin, ``1..n_bins-1`` (uint8).
    cls_id, pad_id, pad_value, max_seq_len
        What :func:`collate_tokens` needs to build model input.
    seed
        ``random_state`` of the gene subsampling above ``max_seq_len``, combined per cell with a
        hash of the cell's tokens (:func:`cell_seed`).
    """

    indptr: np.ndarray
    gene_ids: np.ndarray
    bins: np.ndarray
    cls_id: int
    pad_id: int
    pad_value: float
    max_seq_len: int
    seed: int = 0

    @property
    def n_cells(self) -> int:
        """Number of cells (``len(indptr) - 1``)."""
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return self.n_cells

    @property
    def n_genes_per_cell(self) -> np.ndarray:
        """Expressed, matched genes per cell (before any truncation)."""
        return np.diff(self.indptr)

    @property
    def lengths(self) -> np.ndarray:
        """Model input length per cell: ``<cls>`` plus genes, capped at ``max_seq_len``."""
        return np.minimum(self.n_genes_per_cell + 1, self.max_seq_len)

    @property
    def nbytes(self) -> int:
        """Memory held by ``indptr``, ``gene_ids`` and ``bins``, in bytes."""
        return self.indptr.nbytes + self.gene_ids.nbytes + self.bins.nbytes

    @classmethod
    def concat(cls, parts: Sequence[ScGPTTokens]) -> ScGPTTokens:
        """Tokens of consecutive row ranges joined into one set, in order."""
        return concat_stores(parts, per_token=("gene_ids", "bins"))

    def collate(self, cells: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded model input for ``cells`` (see :func:`collate_tokens`)."""
        return collate_tokens(self, cells)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Gene ids and bins of cell ``i``, subsampled (seeded) if longer than ``max_seq_len``.

        At most ``max_seq_len - 1`` genes are returned (``<cls>`` takes the remaining slot), in
        vocabulary-id order. A longer cell keeps a random subset drawn with
        ``cell_seed(seed, gene_ids, bins)``: the same on every call, whatever the cell's
        position.

        Parameters
        ----------
        i
            Position of the cell in this token set (``0..n_cells - 1``).

        Returns
        -------
        gene_ids : numpy.ndarray
            Vocabulary ids (int32) of the cell's expressed, matched genes, without ``<cls>``.
        bins : numpy.ndarray
            Their expression bins (uint8).

        Examples
        --------
        >>> genes, bins = prepared.tokens.cell(0)  # doctest: +SKIP
        """
        start, stop = self.indptr[i], self.indptr[i + 1]
        genes, bins = self.gene_ids[start:stop], self.bins[start:stop]
        keep = self.max_seq_len - 1
        if len(genes) > keep:
            rng = np.random.default_rng(cell_seed(self.seed, genes, bins))
            idx = np.sort(rng.choice(len(genes), size=keep, replace=False))
            genes, bins = genes[idx], bins[idx]
        return genes, bins


def tokenize_matrix(
    matrix: Any,
    vocab_ids: np.ndarray,
    *,
    n_bins: int,
    cls_id: int,
    pad_id: int,
    pad_value: float,
    max_seq_len: int,
    seed: int = 0,
    progress: bool = False,
) -> ScGPTTokens:
    """Tokenise every cell of ``matrix`` (cells x genes; dense, sparse, backed or dask).

    ``vocab_ids[j]`` is the vocabulary id of column ``j``, or -1 for a gene the vocabulary lacks.
    Memory beyond the tokens themselves is bounded by one chunk of rows. Each cell's tokens
    depend only on its own values, ``vocab_ids`` and ``seed`` (see the module docstring).
    """
    vocab_ids = np.asarray(vocab_ids)
    if n_bins - 1 > np.iinfo(np.uint8).max:
        msg = f"n_bins={n_bins} does not fit the uint8 token store (at most 256)."
        raise ValueError(msg)
    # matched columns in vocabulary-id order: after ``sort_indices`` every row is in that order
    columns = np.flatnonzero(vocab_ids >= 0)
    columns = columns[np.argsort(vocab_ids[columns], kind="stable")]
    block_ids = vocab_ids[columns].astype(np.int32)
    # two columns with one symbol: their order must come from the values, not the columns
    repeated_ids = bool((np.diff(block_ids) == 0).any())
    n_cells = matrix.shape[0]
    counts = np.zeros(n_cells, dtype=np.int64)
    gene_chunks: list[np.ndarray] = []
    bin_chunks: list[np.ndarray] = []
    bar = tqdm(total=n_cells, desc="tokenising", unit="cell", disable=not progress)
    for start, block in iter_row_chunks(matrix):
        block = block[:, columns]
        block.eliminate_zeros()
        block.sort_indices()
        for r in range(block.shape[0]):
            lo, hi = block.indptr[r], block.indptr[r + 1]
            if hi == lo:
                continue
            genes = block_ids[block.indices[lo:hi]]
            values = block.data[lo:hi].astype(np.float64)
            if repeated_ids:
                order = np.lexsort((values, genes))
                genes, values = genes[order], values[order]
            bins = bin_values(values, n_bins, cell_seed(seed, genes, values))
            gene_chunks.append(genes)
            bin_chunks.append(bins.astype(np.uint8))
            counts[start + r] = hi - lo
        bar.update(block.shape[0])
    bar.close()
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return ScGPTTokens(
        indptr=indptr,
        gene_ids=np.concatenate(gene_chunks) if gene_chunks else np.zeros(0, np.int32),
        bins=np.concatenate(bin_chunks) if bin_chunks else np.zeros(0, np.uint8),
        cls_id=cls_id,
        pad_id=pad_id,
        pad_value=float(pad_value),
        max_seq_len=int(max_seq_len),
        seed=seed,
    )


def collate_tokens(tokens: ScGPTTokens, cells: Sequence[int]) -> dict[str, torch.Tensor]:
    """Padded model input for ``cells``: ``gene_ids`` (long), ``values`` (float), ``padding_mask``.

    Position 0 holds ``<cls>`` with value ``pad_value``; the batch is padded to its longest cell
    with ``<pad>`` and ``pad_value``. Cells within ``max_seq_len`` are gathered in one vectorised
    step; only cells above it go through :meth:`ScGPTTokens.cell` for their seeded subsample.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1)
    starts = tokens.indptr[cells]
    counts = tokens.indptr[cells + 1] - starts
    n_kept = np.minimum(counts, tokens.max_seq_len - 1)
    width = 1 + int(n_kept.max(initial=0))
    # every kept token of the batch, row after row: a contiguous slice of the store per cell...
    first = np.cumsum(n_kept) - n_kept
    src = np.arange(int(n_kept.sum())) + np.repeat(starts - first, n_kept)
    genes, bins = tokens.gene_ids[src], tokens.bins[src]
    # ...except cells above max_seq_len, which get their seeded subsample
    for row in np.flatnonzero(counts > n_kept):
        at = slice(first[row], first[row] + n_kept[row])
        genes[at], bins[at] = tokens.cell(int(cells[row]))
    filled = np.arange(1, width) <= n_kept[:, None]  # row-major, the order of ``src``
    gene_ids = np.full((len(cells), width), tokens.pad_id, dtype=np.int64)
    values = np.full((len(cells), width), tokens.pad_value, dtype=np.float32)
    gene_ids[:, 0] = tokens.cls_id
    gene_ids[:, 1:][filled] = genes
    values[:, 1:][filled] = bins
    return {
        "gene_ids": torch.from_numpy(gene_ids),
        "values": torch.from_numpy(values),
        # numpy, not torch: a tiny elementwise op is not worth torch's intra-op thread pool
        "padding_mask": torch.from_numpy(gene_ids == tokens.pad_id),
    }
