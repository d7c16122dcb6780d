"""From raw counts to Geneformer's rank value encoding, stored compactly, and to padded batches.

The rules are upstream's ``TranscriptomeTokenizer`` (GENEFORMER_NOTES.md section 3):

1. genes are matched and, when upstream would, collapsed (see :mod:`._genes`);
2. per cell, each token gene's count is scaled to ``x / n_counts * 10000 / median`` (float64,
   that order of operations), ``n_counts`` being ``obs["n_counts"]`` as given or, when absent,
   the cell's total over every gene of the matrix;
3. the non-zero genes are ranked by that value, highest first;
4. V2 keeps the first ``model_input_size - 2`` and adds ``<cls>`` in front and ``<eos>`` at the
   end; V1 keeps the first ``model_input_size``.

Where this differs from upstream, on purpose:

- Ties are broken by token id (genes of equal median-scaled value are ordered by their token
  id), so a cell's tokens do not depend on the order of the AnnData's genes (DESIGN section 7).
  Upstream's ``np.argsort`` is not stable, so its order inside a tie depends on the numpy version
  and the CPU; outside ties the tokens are the same.
- Every cell keeps its row. A cell without any token gene is ``[<cls>, <eos>]`` (V2) or empty
  (V1); upstream drops it with a warning (here it is logged). ``obs["filter_pass"]`` is not read:
  select cells on the AnnData instead.
- Raw counts are checked: negative, non-finite or non-integer values are refused (upstream
  silently ranks log-normalised data differently).
- Upstream computes ``x / n_counts * 10000`` in float32 when both the matrix and ``n_counts`` are
  float32; here it is always float64. Only values within about 1e-7 of each other can rank
  differently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from scdlkit._shared.progress import tqdm
from scdlkit._shared.validation import get_matrix
from scdlkit.foundation.models._tokens import concat_stores
from scdlkit.foundation.models.geneformer._checkpoint import (
    CONFIG_FILE,
    GeneformerCheckpoint,
    resolve_geneformer_checkpoint,
)
from scdlkit.foundation.models.geneformer._dictionaries import (
    GeneformerDictionaries,
    load_geneformer_dictionaries,
)
from scdlkit.foundation.models.geneformer._genes import (
    GeneformerGeneMatch,
    check_geneformer_overlap,
    match_geneformer_genes,
)

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "TARGET_SUM",
    "GeneformerTokens",
    "rank_value_encode",
    "tokenize_geneformer",
]

logger = logging.getLogger("scdlkit")

TARGET_SUM = 10_000
#: Upstream's ``model_input_size`` per model series (``TranscriptomeTokenizer``).
DEFAULT_INPUT_SIZE = {"V1": 2048, "V2": 4096}
CHUNK_CELLS = 4096


@dataclass
class GeneformerTokens:
    """Geneformer tokens of a set of cells, CSR-like, in model order with the specials.

    Attributes
    ----------
    indptr
        ``(n_cells + 1,)`` int64 offsets into ``gene_ids``.
    gene_ids
        Token ids (int32), per cell exactly the model input: ``<cls>``, genes by rank, ``<eos>``
        (V2) or genes by rank (V1), at most ``max_seq_len`` per cell.
    pad_id
        Token id of ``<pad>`` (0 upstream).
    cls_id, eos_id
        Token ids of ``<cls>`` and ``<eos>`` (V2), ``None`` for V1.
    max_seq_len
        ``model_input_size``: the longest a cell's tokens may be, specials included.
    n_expressed
        Per cell, the token columns with a non-zero count, before truncation (int64).
    pad_value
        Value of every position in the ``values`` a batch carries (Geneformer reads none).
    """

    indptr: np.ndarray
    gene_ids: np.ndarray
    pad_id: int
    cls_id: int | None
    eos_id: int | None
    max_seq_len: int
    n_expressed: np.ndarray
    pad_value: float = 0.0

    @property
    def n_cells(self) -> int:
        """Number of cells (``len(indptr) - 1``)."""
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return self.n_cells

    @property
    def n_special(self) -> int:
        """Special tokens per cell: 2 (``<cls>``, ``<eos>``) for V2, 0 for V1."""
        return 2 if self.cls_id is not None else 0

    @property
    def lengths(self) -> np.ndarray:
        """Model input length per cell, specials included."""
        return np.diff(self.indptr)

    @property
    def n_genes(self) -> np.ndarray:
        """Gene tokens per cell in the model input (0 for a cell without any token gene)."""
        return self.lengths - self.n_special

    @property
    def n_genes_per_cell(self) -> np.ndarray:
        """Expressed token genes per cell before truncation (:attr:`n_expressed`)."""
        return self.n_expressed

    @property
    def nbytes(self) -> int:
        """Memory held by ``indptr``, ``gene_ids`` and ``n_expressed``, in bytes."""
        return self.indptr.nbytes + self.gene_ids.nbytes + self.n_expressed.nbytes

    def cell(self, i: int) -> np.ndarray:
        """Token ids of cell ``i`` as the model reads them (a view).

        Parameters
        ----------
        i
            Position of the cell (``0..n_cells - 1``).

        Returns
        -------
        numpy.ndarray
            int32 token ids, specials included.
        """
        return self.gene_ids[self.indptr[i] : self.indptr[i + 1]]

    @classmethod
    def concat(cls, parts: Sequence[GeneformerTokens]) -> GeneformerTokens:
        """Tokens of consecutive row ranges joined into one set, in order."""
        return concat_stores(parts, per_token=("gene_ids",), per_cell=("n_expressed",))

    def collate(self, cells: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded model input for ``cells``, right-padded to the batch's longest cell.

        Parameters
        ----------
        cells
            Positions of the cells in this store.

        Returns
        -------
        dict
            ``gene_ids`` (int64, ``<pad>`` after each cell), ``values`` (float32, all
            ``pad_value``: Geneformer has no value input, the pipeline passes one) and
            ``padding_mask`` (bool, True at pad positions), each ``(len(cells), width)``.

        Examples
        --------
        >>> batch = tokens.collate(range(8))  # doctest: +SKIP
        >>> model.cell_embedding(**batch)  # doctest: +SKIP
        """
        cells = np.asarray(cells, dtype=np.int64).reshape(-1)
        starts = self.indptr[cells]
        counts = self.indptr[cells + 1] - starts
        width = max(int(counts.max(initial=0)), 1)
        first = np.cumsum(counts) - counts
        src = np.arange(int(counts.sum())) + np.repeat(starts - first, counts)
        filled = np.arange(width) < counts[:, None]
        gene_ids = np.full((len(cells), width), self.pad_id, dtype=np.int64)
        gene_ids[filled] = self.gene_ids[src]
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "values": torch.full((len(cells), width), self.pad_value, dtype=torch.float32),
            "padding_mask": torch.from_numpy(~filled),
        }


def _row_chunks(matrix: Any, chunk: int) -> Iterator[tuple[int, sparse.csr_matrix]]:
    """``(start, rows as CSR)`` in the stored dtype; dense, sparse, backed or dask matrices."""
    n = matrix.shape[0]
    for start in range(0, n, chunk):
        block = matrix[start : min(start + chunk, n)]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
        if hasattr(block, "to_memory"):  # anndata's backed sparse dataset
            block = block.to_memory()
        yield start, sparse.csr_matrix(block)


def _where(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _counts_hint(adata: Any, layer: str | None) -> str:
    layers = [k for k in adata.layers if k != layer]
    if layers:
        return f"pass layer= naming the layer that holds them (this AnnData has {layers})"
    return "pass layer= naming a layer that holds them (e.g. layer='counts')"


def _check_counts(
    data: np.ndarray, adata: Any, layer: str | None, start: int, rows: np.ndarray
) -> None:
    """Refuse values that are not raw counts, naming the first offending cell."""
    bad = ~np.isfinite(data) | (data < 0) | (data != np.floor(data))
    if not bad.any():
        return
    at = int(np.flatnonzero(bad)[0])
    value, cell = data[at], adata.obs_names[start + int(rows[at])]
    if not np.isfinite(value):
        what = f"a non-finite value ({value}) in cell {cell!r}"
    elif value < 0:
        what = f"negative values (e.g. {value:g} in cell {cell!r})"
    else:
        what = (
            f"non-integer values (e.g. {value:.4g} in cell {cell!r}), so it looks normalised or "
            "log-transformed (scanpy's pbmc68k_reduced .raw, for one, is log-normalised)"
        )
    msg = (
        f"{_where(layer)} holds {what}. Geneformer ranks genes by raw counts scaled by each "
        f"cell's total and each gene's corpus median, so it needs the raw integer counts: "
        f"{_counts_hint(adata, layer)}."
    )
    raise ValueError(msg)


def _n_counts(adata: Any) -> np.ndarray | None:
    if "n_counts" not in adata.obs.columns:
        return None
    try:
        return np.asarray(adata.obs["n_counts"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = "adata.obs['n_counts'] must hold each cell's total count (numbers)."
        raise ValueError(msg) from err


def rank_value_encode(
    block: sparse.csr_matrix,
    plan: sparse.csr_matrix,
    column_tokens: np.ndarray,
    column_medians: np.ndarray,
    n_counts: np.ndarray,
    *,
    limit: int,
    cls_id: int | None = None,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank value encoding of a block of cells (the core of upstream's tokenizer).

    Parameters
    ----------
    block
        ``(cells, genes)`` raw counts, CSR.
    plan
        ``(genes, token columns)`` 0/1 matrix: which input columns feed each token column
        (summed when several do).
    column_tokens
        Token id per token column.
    column_medians
        Corpus median per token column.
    n_counts
        Per cell total count (float64), the normalisation's denominator.
    limit
        Gene tokens kept per cell (``model_input_size`` minus the specials).
    cls_id, eos_id
        Added around each cell's genes when given (V2).

    Returns
    -------
    counts : numpy.ndarray
        Tokens per cell, specials included (int64).
    tokens : numpy.ndarray
        The cells' tokens, one after the other (int32).
    expressed : numpy.ndarray
        Non-zero token columns per cell, before truncation (int64).
    """
    reduced = sparse.csr_matrix(block.astype(np.float64) @ plan)
    reduced.eliminate_zeros()
    n_rows = reduced.shape[0]
    per_row = np.diff(reduced.indptr)
    rows = np.repeat(np.arange(n_rows), per_row)
    # upstream's arithmetic, in its order: x / n_counts * target_sum / median
    values = reduced.data / n_counts[rows] * TARGET_SUM / column_medians[reduced.indices]
    # one small sort per cell, as upstream (numpy's fast unstable sort)...
    order = np.empty(len(values), dtype=np.int64)
    starts = reduced.indptr
    for r in range(n_rows):
        lo, hi = starts[r], starts[r + 1]
        order[lo:hi] = lo + np.argsort(-values[lo:hi])
    # ...then equal values ordered by token id (upstream leaves their order undefined), so a
    # cell's tokens do not depend on the order of the AnnData's genes
    order = _ties_by_token(order, values, rows, column_tokens[reduced.indices])
    ranked = column_tokens[reduced.indices[order]]
    rank = np.arange(len(order)) - np.repeat(reduced.indptr[:-1], per_row)
    keep = rank < limit
    kept = np.minimum(per_row, limit)
    specials = 2 if cls_id is not None else 0
    counts = kept + specials
    offsets = np.cumsum(counts) - counts
    tokens = np.empty(int(counts.sum()), dtype=np.int32)
    if specials:
        tokens[offsets] = cls_id
        tokens[offsets + counts - 1] = eos_id
    tokens[(offsets + specials // 2)[rows[keep]] + rank[keep]] = ranked[keep]
    return counts.astype(np.int64), tokens, per_row.astype(np.int64)


def _ties_by_token(
    order: np.ndarray, values: np.ndarray, rows: np.ndarray, tokens: np.ndarray
) -> np.ndarray:
    """``order`` (each row's entries by descending value) with runs of equal values in one row
    reordered by ascending token id."""
    ranked = values[order]
    tie = (ranked[1:] == ranked[:-1]) & (rows[1:] == rows[:-1])  # rows: order keeps row blocks
    if not tie.any():
        return order
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = ~tie
    run = np.cumsum(starts)  # one id per run of equal values (and per untied entry)
    positions = np.flatnonzero(in_run)
    reordered = positions[np.lexsort((tokens[order[positions]], run[positions]))]
    order = order.copy()
    order[positions] = order[reordered]
    return order


def _plan_matrix(match: GeneformerGeneMatch) -> sparse.csr_matrix:
    single = match.single_columns
    groups = match.summed_groups
    rows = np.concatenate([single, *groups]) if groups else single
    cols = np.concatenate(
        [np.arange(len(single)), *(np.full(len(g), len(single) + k) for k, g in enumerate(groups))]
    )
    return sparse.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(len(match.names), match.n_columns)
    )


def _dictionaries_of(
    source: GeneformerCheckpoint | GeneformerDictionaries | str | os.PathLike,
) -> tuple[GeneformerDictionaries, GeneformerCheckpoint | None]:
    if isinstance(source, GeneformerCheckpoint):
        return source.dictionaries, source
    if isinstance(source, GeneformerDictionaries):
        return source, None
    path = Path(source)
    if (path / CONFIG_FILE).is_file():
        ckpt = resolve_geneformer_checkpoint(path)
        return ckpt.dictionaries, ckpt
    return load_geneformer_dictionaries(path), None


def _input_size(
    requested: int | None, dicts: GeneformerDictionaries, ckpt: GeneformerCheckpoint | None
) -> int:
    limit = ckpt.model_input_size if ckpt is not None else None
    if requested is None:
        return limit if limit is not None else DEFAULT_INPUT_SIZE[dicts.version]
    least = 3 if dicts.version == "V2" else 1
    if not isinstance(requested, (int, np.integer)) or requested < least:
        msg = (
            f"model_input_size={requested!r} must be an integer of at least {least} "
            f"({'<cls>, one gene and <eos>' if least == 3 else 'one gene'})."
        )
        raise ValueError(msg)
    if limit is not None and requested > limit:
        msg = (
            f"model_input_size={requested} exceeds the model's {limit} positions "
            "(max_position_embeddings); use at most that, or None."
        )
        raise ValueError(msg)
    return int(requested)


def tokenize_geneformer(
    adata: Any,
    checkpoint_or_dictionaries: GeneformerCheckpoint | GeneformerDictionaries | str | os.PathLike,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    model_input_size: int | None = None,
    id_type: str = "auto",
    min_gene_overlap: int | float = 1,
    chunk_size: int = CHUNK_CELLS,
    progress: bool = False,
    match: GeneformerGeneMatch | None = None,
) -> tuple[GeneformerTokens, GeneformerGeneMatch]:
    """Tokenise every cell of ``adata`` as upstream's ``TranscriptomeTokenizer`` does.

    Reads the matrix in chunks of ``chunk_size`` rows and never densifies it, so backed and dask
    AnnData work; the AnnData is not modified. Differences from upstream are listed in the module
    docstring (tie order, cells without token genes kept, counts checked).

    Parameters
    ----------
    adata
        Cells x genes, raw integer counts, in memory, dask or backed.
    checkpoint_or_dictionaries
        A :class:`GeneformerCheckpoint` (or a checkpoint folder), or
        :class:`GeneformerDictionaries` (or a folder holding one set of dictionaries).
    gene_key
        ``adata.var`` column with Ensembl gene ids (or symbols); ``None`` uses ``var_names``.
    layer
        Layer with the raw counts; ``None`` uses ``adata.X``.
    model_input_size
        Longest tokenised cell, specials included. ``None``: the checkpoint's
        ``max_position_embeddings``, or upstream's default (4096 V2, 2048 V1) for dictionaries.
    id_type
        ``"ensembl"``, ``"symbol"`` or ``"auto"`` (see :func:`match_geneformer_genes`).
    min_gene_overlap
        Least number of genes (int), or fraction (float below 1), that must reach a token.
    chunk_size
        Cells read at a time.
    progress
        Show a progress bar.
    match
        The gene match of this AnnData when already made (by the preflight, or for an earlier
        slice of rows); ``None`` matches the genes here.

    Returns
    -------
    tokens : GeneformerTokens
        One entry per cell, in the AnnData's order.
    match : GeneformerGeneMatch
        Which genes reached a token, and whether upstream's collapsing applied.

    Raises
    ------
    KeyError
        ``gene_key`` or ``layer`` not found.
    ValueError
        Values that are not raw counts (negative, non-finite, non-integer), too few matched
        genes, a cell with expression but a non-positive or non-finite ``obs["n_counts"]``, or
        an invalid ``model_input_size``.

    Examples
    --------
    >>> ckpt = resolve_geneformer_checkpoint("Geneformer/Geneformer-V2-104M")  # doctest: +SKIP
    >>> tokens, match = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")  # doctest: +SKIP
    >>> tokens.lengths[:3], match.ratio  # doctest: +SKIP
    """
    dicts, ckpt = _dictionaries_of(checkpoint_or_dictionaries)
    input_size = _input_size(model_input_size, dicts, ckpt)
    if chunk_size < 1:
        msg = f"chunk_size={chunk_size} must be at least 1."
        raise ValueError(msg)
    if match is None:
        match = match_geneformer_genes(adata, dicts, gene_key, id_type=id_type)
    check_geneformer_overlap(match, gene_key=gene_key, min_gene_overlap=min_gene_overlap)
    matrix = get_matrix(adata, layer)
    given_counts = _n_counts(adata)
    plan = _plan_matrix(match)
    column_tokens = match.column_token_ids
    ensembl = match.ensembl_ids
    column_ids = [ensembl[j] for j in match.single_columns] + [
        ensembl[g[0]] for g in match.summed_groups
    ]
    column_medians = np.array([dicts.medians[g] for g in column_ids], dtype=np.float64)
    limit = input_size - 2 if dicts.version == "V2" else input_size
    cls_id, eos_id = (dicts.cls_id, dicts.eos_id) if dicts.version == "V2" else (None, None)
    n_cells = matrix.shape[0]
    all_counts: list[np.ndarray] = []
    all_tokens: list[np.ndarray] = []
    all_expressed: list[np.ndarray] = []
    bar = tqdm(total=n_cells, desc="tokenising for Geneformer", unit="cell", disable=not progress)
    for start, block in _row_chunks(matrix, chunk_size):
        rows_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        _check_counts(block.data, adata, layer, start, rows_of)
        if given_counts is None:
            n_counts = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        else:
            n_counts = given_counts[start : start + block.shape[0]]
        has_counts = np.bincount(rows_of[block.data != 0], minlength=block.shape[0]) > 0
        invalid = has_counts & ~(np.isfinite(n_counts) & (n_counts > 0))
        if invalid.any():
            at = int(np.flatnonzero(invalid)[0])
            msg = (
                f"adata.obs['n_counts'] of cell {adata.obs_names[start + at]!r} is "
                f"{float(n_counts[at])}, but the cell has counts: n_counts must be each cell's "
                "total count (positive). Fix it, or drop the column to use the row totals."
            )
            raise ValueError(msg)
        counts, tokens, expressed = rank_value_encode(
            block,
            plan,
            column_tokens,
            column_medians,
            n_counts,
            limit=limit,
            cls_id=cls_id,
            eos_id=eos_id,
        )
        all_counts.append(counts)
        all_tokens.append(tokens)
        all_expressed.append(expressed)
        bar.update(block.shape[0])
    bar.close()
    counts = np.concatenate(all_counts) if all_counts else np.zeros(0, np.int64)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    out = GeneformerTokens(
        indptr=indptr,
        gene_ids=np.concatenate(all_tokens) if all_tokens else np.zeros(0, np.int32),
        pad_id=dicts.pad_id,
        cls_id=cls_id,
        eos_id=eos_id,
        max_seq_len=input_size,
        n_expressed=np.concatenate(all_expressed) if all_expressed else np.zeros(0, np.int64),
    )
    empty = int((out.n_genes == 0).sum())
    if empty:
        logger.warning(
            "%d of %d cells express no gene in the Geneformer token dictionary; they are kept "
            "with %s (upstream drops them): consider QC for empty droplets",
            empty,
            n_cells,
            "<cls> and <eos> only" if cls_id is not None else "no tokens",
        )
    logger.info(
        "tokenised %d cells for Geneformer %s: %d of %d genes matched%s, median %d tokens per cell",
        n_cells,
        dicts.version,
        match.n_matched,
        len(match.names),
        " (ids collapsed as upstream)" if match.collapsed else "",
        int(np.median(out.lengths)) if n_cells else 0,
    )
    return out, match
