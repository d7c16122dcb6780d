"""Running the encoder over tokenised cells, length-grouped, returning ``<cls>`` outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from scdlkit._shared.progress import tqdm
from scdlkit.foundation._device import autocast_context
from scdlkit.foundation.models._contract import TokenStore

__all__ = ["encode_cells", "inference_batches", "l2_normalise", "pad_batch", "padded_width"]

#: A batch holds cells at least this fraction of its longest cell's length, so padding (and the
#: attention spent on it) stays within a few percent whatever the dataset's size...
LENGTH_SLACK = 0.9
#: ...unless that would leave it under this many (padded) tokens: tiny matrix products waste
#: more time on CPU threads than a little padding does. (4,096 made 32 cells of 150 to 1,100
#: genes compute 17% more projections and 35% more attention than their tokens need.)
MIN_BATCH_TOKENS = 1024
#: Batches are padded to a multiple of this many tokens, and hold ``batch_size`` or a power of
#: two cells: a few dozen distinct shapes whatever the data. CPU kernels keep per-shape state
#: (oneDNN primitives and bf16 attention kernels hold 1-4 MB each at whole-human size), so
#: shapes that never repeat grew memory with the number of cells. bf16 attention also runs
#: faster at lengths that are multiples of 32 or 64.
WIDTH_MULTIPLE = 32


def padded_width(length: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-int(length) // multiple) * multiple


def _batch_sizes(batch_size: int) -> list[int]:
    """``batch_size`` and the powers of two below it, largest first."""
    return sorted(
        {batch_size} | {2**k for k in range(batch_size.bit_length()) if 2**k < batch_size}
    )[::-1]


def inference_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    slack: float = LENGTH_SLACK,
    min_tokens: int = MIN_BATCH_TOKENS,
    multiple: int = WIDTH_MULTIPLE,
) -> Iterator[np.ndarray]:
    """Positions into ``lengths``, longest first, in batches of similar length.

    A batch's width is its longest cell's length rounded up to ``multiple``. It takes up to
    ``batch_size`` cells in decreasing length and stops early at the first cell shorter than
    ``slack`` times its width, once it holds ``min_tokens`` tokens with padding; a batch cut
    short holds the largest power of two of cells that fits, the next batch the rest. With many
    cells the batches are full; with few, they are smaller rather than padded to a much longer
    neighbour. Widths and sizes come from small fixed sets, so shapes repeat.
    """
    if batch_size < 1:
        msg = f"batch_size={batch_size} must be at least 1."
        raise ValueError(msg)
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    ascending = -lengths[order]  # non-decreasing, for searchsorted
    sizes = _batch_sizes(batch_size)
    start, n = 0, len(order)
    while start < n:
        width = padded_width(max(int(-ascending[start]), 1), multiple)
        similar = int(np.searchsorted(ascending, -np.ceil(slack * width), side="right"))
        enough = start + -(-min_tokens // width)  # cells to reach min_tokens
        count = min(batch_size, max(similar, enough, start + 1) - start, n - start)
        count = next(size for size in sizes if size <= count)
        yield order[start : start + count]
        start += count


def pad_batch(
    batch: dict[str, torch.Tensor], width: int, *, pad_id: int, pad_value: float
) -> dict[str, torch.Tensor]:
    """A token store's collated batch padded on the right to ``width`` positions."""
    extra = width - batch["gene_ids"].shape[1]
    if extra <= 0:
        return batch
    fills = {"gene_ids": pad_id, "values": pad_value, "padding_mask": True}
    return {
        key: torch.cat([value, value.new_full((value.shape[0], extra), fills[key])], dim=1)
        for key, value in batch.items()
    }


def _copy_to_host(result: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a batch result to (pinned) host memory; the event says when it is done."""
    result = result.float()
    if result.device.type != "cuda":
        return result.cpu(), None
    host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(result, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def encode_cells(
    tokens: TokenStore,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    device: torch.device,
    batch_size: int = 64,
    precision: str = "auto",
    cells: np.ndarray | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> np.ndarray:
    """Apply ``forward`` (batch dict -> ``(batch, k)`` tensor) to every cell, in input order.

    Cells of similar length share a batch (:func:`inference_batches`), padded to a multiple of
    :data:`WIDTH_MULTIPLE` tokens, so padding costs little and batch shapes repeat; results are
    put back in the order of ``cells`` (default: all cells). On CUDA, the next batch is built
    on the CPU while the GPU runs the current one.
    """
    cells = np.arange(tokens.n_cells) if cells is None else np.asarray(cells)
    out: np.ndarray | None = None
    pending: tuple[np.ndarray, torch.Tensor, torch.cuda.Event | None] | None = None
    pin = device.type == "cuda"

    def finish(positions: np.ndarray, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        if done is not None:
            done.synchronize()
        out[positions] = host.numpy()
        bar.update(len(positions))

    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    with torch.inference_mode(), autocast_context(device, precision):
        multiple = WIDTH_MULTIPLE  # read at call time, so benchmarks can compare settings
        for positions in inference_batches(tokens.lengths[cells], batch_size, multiple=multiple):
            batch = tokens.collate(cells[positions])
            # never past the model's input length (its position table may not be a multiple)
            width = min(
                padded_width(batch["gene_ids"].shape[1], multiple),
                max(tokens.max_seq_len, batch["gene_ids"].shape[1]),
            )
            batch = pad_batch(batch, width, pad_id=tokens.pad_id, pad_value=tokens.pad_value)
            batch = {
                k: (v.pin_memory() if pin else v).to(device, non_blocking=True)
                for k, v in batch.items()
            }
            result = forward(batch)
            if out is None:
                out = np.empty((len(cells), result.shape[1]), dtype=np.float32)
            if pending is not None:  # the previous batch: finished or about to be
                finish(*pending)
            pending = (positions, *_copy_to_host(result))
        if pending is not None:
            finish(*pending)
    bar.close()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms == 0, 1, norms)).astype(np.float32)
