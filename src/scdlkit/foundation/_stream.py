"""Embedding and prediction over cells in chunks, optionally sharded across processes.

Peak memory depends on ``chunk_size``, not on the number of cells: each chunk of rows is read
(from memory, a backed ``.h5ad`` or a dask array), tokenised, run through the model and dropped.
A cell's tokens depend on its content alone (``_tokenize``), so chunked, sharded and in-memory
runs give the same tokens and results.

Memory between chunks is bounded in code: a chunk is tokenised :data:`TOKENIZE_ROWS` cells at a
time (the tokeniser's temporaries are several times the tokens it makes), inference batches come
in a few dozen shapes (``_embed``: CPU kernels keep state per shape), and after each chunk the C
heap is handed back to the system (glibc's ``malloc_trim``), which otherwise keeps freed blocks of
the last chunk mapped.

Sharding: under ``torch.distributed`` (a ``torchrun`` or Fabric DDP launch, one process per GPU
or node), each process runs every ``world_size``-th length-sorted batch of each chunk and the
results are gathered back in cell order on every process.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from scdlkit._shared.validation import validate_values
from scdlkit.foundation._embed import encode_cells
from scdlkit.foundation.models import model_card
from scdlkit.foundation.models._contract import ModelCheckpoint

__all__ = ["DEFAULT_CHUNK_SIZE", "TOKENIZE_ROWS", "encode_adata", "process_group"]

DEFAULT_CHUNK_SIZE = 50_000
#: Cells read and tokenised at a time within a chunk: 5,000 cells at once made 101 MiB of
#: temporaries for 19 MiB of tokens (700 expressed genes per cell).
TOKENIZE_ROWS = 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` (other systems and C libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_memory() -> None:
    """Collect garbage and give the freed C heap back to the system where glibc allows it."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the running ``torch.distributed`` job, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _shard(n_cells: int, rank: int, world: int) -> np.ndarray:
    """Cells of this rank: a strided share, so every rank gets long and short cells alike."""
    return np.arange(rank, n_cells, world)


def _gather(local: np.ndarray, cells: np.ndarray, n_cells: int, world: int) -> np.ndarray:
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (cells, local))
    width = next(p[1].shape[1] for p in parts if len(p[0]))
    out = np.empty((n_cells, width), dtype=np.float32)
    for part_cells, part in parts:
        if len(part_cells):
            out[part_cells] = part
    return out


def encode_adata(
    adata: Any,
    checkpoint: ModelCheckpoint,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    device: torch.device,
    gene_key: str | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    seed: int = 0,
    chunk_size: int | None = None,
    min_gene_overlap: int | float = 1,
    progress: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, Any]:
    """``forward`` applied to every cell of ``adata``, chunk by chunk, rows in cell order.

    Parameters
    ----------
    adata
        In memory, backed (``read_h5ad(..., backed="r")``) or with a dask matrix.
    checkpoint
        The vocabulary and token settings.
    forward
        Batch dict -> ``(batch, k)`` tensor (e.g. the ``<cls>`` output).
    chunk_size
        Cells per chunk; ``None`` is all cells of an in-memory AnnData and
        :data:`DEFAULT_CHUNK_SIZE` for a backed one.

    Returns
    -------
    ``(n_cells, k)`` float32 results (on every process when sharded) and the gene match.
    """
    n_cells = adata.n_obs
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE if getattr(adata, "isbacked", False) else max(n_cells, 1)
    if chunk_size < 1:
        msg = f"chunk_size={chunk_size} must be at least 1."
        raise ValueError(msg)
    card = model_card(checkpoint)
    validate_values(adata, layer)  # one streaming pass, before any model work
    rank, world = process_group()
    out: np.ndarray | None = None
    match: Any = None
    # one in-memory chunk: tokenised at once, with its progress bar; otherwise in slices
    streaming = chunk_size < n_cells or getattr(adata, "isbacked", False)
    step = TOKENIZE_ROWS if streaming else max(chunk_size, 1)
    for start in range(0, max(n_cells, 1), chunk_size):
        stop = min(start + chunk_size, n_cells)
        parts = []
        for first in range(start, max(stop, start + 1), step):
            part, match = card.tokenize(
                adata,
                checkpoint,
                gene_key=gene_key,
                layer=layer,
                min_gene_overlap=min_gene_overlap,
                seed=seed,
                rows=slice(first, min(first + step, stop)),
                check_values=False,
                progress=progress and rank == 0 and not streaming,
                match=match,  # genes matched once, for the first slice
            )
            parts.append(part)
        tokens = type(parts[0]).concat(parts)
        del parts
        cells = _shard(tokens.n_cells, rank, world)
        local = encode_cells(
            tokens,
            forward,
            device=device,
            batch_size=batch_size,
            precision=precision,
            cells=cells,
            progress=progress and rank == 0,
            desc=desc,
        )
        result = _gather(local, cells, tokens.n_cells, world)
        if out is None:
            out = np.empty((n_cells, result.shape[1]), dtype=np.float32)
        out[start:stop] = result
        if streaming:
            del tokens, local, result
            release_memory()
    return out, match  # the loop runs at least once, so both are set
