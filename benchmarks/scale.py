"""Atlas-scale embedding: cells/s and peak memory on a backed ``.h5ad``, fp32 vs bf16.

Writes a synthetic backed ``.h5ad`` (sparse counts; cells express a few hundred to two thousand
genes, log-normal around 700) in chunks, then embeds it with ``sck.tl.embed`` on the backed
AnnData (``chunk_size`` cells at a time), each run in a fresh process so its peak RSS is its own.
Checkpoints: the tiny fixture (all cells) and, with ``--whole-human-sample N``, a whole-human-sized
random checkpoint on the first N cells.

Run: ``python benchmarks/scale.py --n-cells 1000000`` (default 100,000; ``--quick``: 2,000);
``--bf16-cells N`` limits the bf16 runs to the first N cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "scgpt-tiny-flash" / "checkpoint"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def vocab_genes(checkpoint: Path, n: int) -> list[str]:
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    genes = [g for g in sorted(vocab, key=vocab.get) if not g.startswith("<")]
    return genes[:n]


def write_backed(path: Path, n_cells: int, genes: list[str], *, chunk: int = 20_000) -> float:
    """Write ``n_cells`` synthetic cells to ``path`` chunk by chunk; returns non-zeros per cell."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem
    from scipy import sparse

    rng = np.random.default_rng(0)
    n_genes = len(genes)
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    ad.AnnData(obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    nnz_total = 0
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            per_cell = np.clip(rng.lognormal(np.log(700), 0.5, rows).astype(int), 200, 2000)
            per_cell = np.minimum(per_cell, n_genes)
            indptr = np.concatenate([[0], np.cumsum(per_cell)])
            indices = np.concatenate(
                [np.sort(rng.choice(n_genes, k, replace=False)) for k in per_cell]
            )
            data = rng.negative_binomial(2, 0.3, indptr[-1]).astype(np.float32) + 1
            block = sparse.csr_matrix(
                (data, indices.astype(np.int32), indptr), shape=(rows, n_genes)
            )
            nnz_total += block.nnz
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
    return nnz_total / n_cells


def embed_once(path: str, checkpoint: str, precision: str, n_cells: int, chunk: int) -> dict:
    """Run in a child process: embed the backed file, report cells/s and peak RSS."""
    import anndata as ad

    import scdlkit as sck

    backed = ad.read_h5ad(path, backed="r")
    if backed.n_obs != n_cells:
        msg = f"{path} holds {backed.n_obs} cells, expected {n_cells}"
        raise ValueError(msg)
    start = time.perf_counter()
    sck.tl.embed(
        backed,
        checkpoint=checkpoint,
        device="cpu",
        precision=precision,
        chunk_size=chunk,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"seconds": seconds, "cells_per_s": backed.n_obs / seconds, "peak_rss_gib": peak}


def run_child(path: Path, checkpoint: Path, precision: str, n_cells: int, chunk: int) -> dict:
    """Embed in a fresh process so the peak RSS measured is the embedding's alone."""
    command = [sys.executable, __file__, "--child", str(path), str(checkpoint), precision]
    command += [str(n_cells), str(chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=20_000)
    parser.add_argument(
        "--whole-human-sample", type=int, default=0, help="cells for a 12-layer run"
    )
    parser.add_argument(
        "--bf16-cells", type=int, default=0, help="cells for the bf16 runs (default: all)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the synthetic .h5ad is written")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, checkpoint, precision, cells, chunk = args.child
        print(json.dumps(embed_once(path, checkpoint, precision, int(cells), int(chunk))))
        return 0
    n_cells = 2_000 if args.quick else args.n_cells
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scdlkit-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"synthetic_{n_cells}.h5ad"
    genes = vocab_genes(FIXTURE, 3000)
    start = time.perf_counter()
    nnz = write_backed(path, n_cells, genes)
    written = time.perf_counter() - start
    size_gib = path.stat().st_size / 2**30
    print(f"machine: {machine()}")
    print(
        f"data: {n_cells:,} cells x {len(genes):,} genes, {nnz:.0f} expressed genes per cell "
        f"(mean), backed .h5ad of {size_gib:.2f} GiB written in {written:.0f} s; "
        f"chunk_size {args.chunk_size:,}"
    )
    print("| checkpoint | precision | cells | cells/s | peak RSS |")
    print("|---|---|---|---|---|")
    bf16_cells = min(args.bf16_cells or n_cells, n_cells)
    runs = [("tiny fixture (2 layers, d=32)", FIXTURE, n_cells, bf16_cells)]
    if args.whole_human_sample:
        from scdlkit.demo import write_random_checkpoint

        big = write_random_checkpoint(
            workdir / "whole_human_random", genes, embsize=512, nheads=8, d_hid=512, nlayers=12
        )
        sample = args.whole_human_sample
        runs.append(("whole-human size (12 layers, d=512)", big, sample, sample))
    files = {n_cells: path}
    for label, checkpoint, fp32_cells, bf16_cells in runs:
        for precision, cells in (("fp32", fp32_cells), ("bf16", bf16_cells)):
            if cells not in files:  # a smaller file of the same kind of cells, not a backed view
                files[cells] = workdir / f"synthetic_{cells}.h5ad"
                write_backed(files[cells], cells, genes)
            result = run_child(files[cells], checkpoint, precision, cells, args.chunk_size)
            print(
                f"| {label} | {precision} | {cells:,} | {result['cells_per_s']:.1f} | "
                f"{result['peak_rss_gib']:.2f} GiB |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
