"""Running the encoder over tokenised cells, length-grouped, returning ``<cls>`` outputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from scdlkit.foundation._device import autocast_context
from scdlkit.foundation._tokenize import ScGPTTokens, collate_tokens, length_grouped_batches

__all__ = ["encode_cells", "l2_normalise"]


def encode_cells(
    tokens: ScGPTTokens,
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

    Cells of similar length share a batch, so padding costs almost nothing; results are put back
    in the order of ``cells`` (default: all cells).
    """
    from tqdm.auto import tqdm

    cells = np.arange(tokens.n_cells) if cells is None else np.asarray(cells)
    out: np.ndarray | None = None
    bar = tqdm(total=len(cells), desc=desc, unit="cell", disable=not progress)
    with torch.inference_mode(), autocast_context(device, precision):
        for positions in length_grouped_batches(tokens.lengths[cells], batch_size):
            batch = collate_tokens(tokens, cells[positions])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            result = forward(batch).float().cpu().numpy()
            if out is None:
                out = np.empty((len(cells), result.shape[1]), dtype=np.float32)
            out[positions] = result
            bar.update(len(positions))
    bar.close()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms == 0, 1, norms)).astype(np.float32)
