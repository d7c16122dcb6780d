"""Embed the fixture cells with two CPU processes (gloo); rank 0 saves what every rank got.

Usage: python _shard_embed_script.py CHECKPOINT DATA.h5ad OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, checkpoint: str, data: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    import anndata as ad

    import scdlkit as sck

    adata = ad.read_h5ad(data)
    sck.tl.embed(adata, checkpoint=checkpoint, device="cpu", progress=False, chunk_size=20)
    np.save(Path(out) / f"rank{rank}.npy", adata.obsm["X_scgpt"])
    dist.destroy_process_group()


if __name__ == "__main__":
    checkpoint, data, out = sys.argv[1:4]
    mp.spawn(worker, args=(2, checkpoint, data, out), nprocs=2, join=True)
