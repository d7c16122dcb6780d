"""Embed or predict with two CPU processes (gloo); each rank saves what it received.

Usage: python _shard_script.py embed CHECKPOINT DATA.h5ad OUT_DIR
       python _shard_script.py predict RUNNER_DIR DATA.h5ad OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, mode: str, source: str, data: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    import anndata as ad

    import scdlkit as sck

    adata = ad.read_h5ad(data)
    if mode == "embed":
        sck.tl.embed(adata, checkpoint=source, device="cpu", progress=False, chunk_size=20)
        result = adata.obsm["X_scgpt"]
    else:
        runner = sck.AnnotationRunner.load(source, device="cpu")
        result = runner.predict(adata, chunk_size=30)["probabilities"]
    np.save(Path(out) / f"rank{rank}.npy", result)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, source, data, out = sys.argv[1:5]
    mp.spawn(worker, args=(2, mode, source, data, out), nprocs=2, join=True)
