"""Embed or predict with two CPU processes (gloo); each rank saves what it received.

``embed`` is launched the way the docs show for Python users, by Lightning Fabric
(``strategy="ddp_spawn"``, ``devices=2``); ``predict`` joins a process group set up by hand, as a
``torchrun`` script would.

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


def embed_with_fabric(fabric, source: str, data: str, out: str) -> None:
    import anndata as ad

    import scdlkit as sck

    torch.set_num_threads(1)
    adata = ad.read_h5ad(data, backed="r")
    sck.tl.embed(
        adata, checkpoint=source, device="cpu", precision="fp32", progress=False, chunk_size=20
    )
    np.save(Path(out) / f"rank{fabric.global_rank}.npy", adata.obsm["X_scgpt"])


def predict_worker(rank: int, world: int, source: str, data: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    import anndata as ad

    import scdlkit as sck

    adata = ad.read_h5ad(data)
    runner = sck.AnnotationRunner.load(source, device="cpu")
    result = runner.predict(adata, chunk_size=30)["probabilities"]
    np.save(Path(out) / f"rank{rank}.npy", result)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, source, data, out = sys.argv[1:5]
    if mode == "embed":
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
        fabric.launch(embed_with_fabric, source, data, out)
    else:
        mp.spawn(predict_worker, args=(2, source, data, out), nprocs=2, join=True)
