"""Memory of streaming ``sck.tl.embed`` over a backed ``.h5ad``: growth over a warmed-up process.

Writes synthetic backed files of ``--n-cells`` and twice as many cells (sparse counts over 2,000
vocabulary genes; cells express a few hundred to two thousand genes, log-normal around 700) and
embeds each with ``sck.tl.embed(backed, chunk_size=...)``, each run in a fresh process:

1. warm-up: the same call on the first ``--warm-cells`` cells (loaded into memory), so imports,
   the checkpoint, allocator pools and kernel caches of the first chunk are in place;
2. the resident set (``VmRSS``) is read and the peak (``VmHWM``) reset (``/proc/self/clear_refs``);
3. the whole backed file is embedded; reported: peak growth (``VmHWM`` minus the RSS before) and
   what stays after the call returns (RSS after minus before), in MiB.

Results themselves grow with the file (``obsm`` holds ``n_cells x d`` float32, and one more
array of that size exists while the call runs); their size is printed beside the growth.
``--diagnose`` adds runs with the oneDNN primitive cache disabled and glibc's heap trimmed by the
harness after the call, to show where retained memory comes from (diagnosis only; the package
bounds it in code). Linux only (``/proc``).

Run: ``python benchmarks/stream_memory.py`` (60,000 and 120,000 cells, ``chunk_size=5000``, the
tiny test checkpoint; several minutes on 2 cores), ``--quick`` for a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "scgpt-tiny-flash" / "checkpoint"
N_GENES = 2000


def vocab_genes(checkpoint: Path, n: int) -> list[str]:
    vocab = json.loads((checkpoint / "vocab.json").read_text())
    genes = [g for g in sorted(vocab, key=vocab.get) if not g.startswith("<")]
    return genes[:n]


def write_backed(
    path: Path, n_cells: int, genes: list[str], *, median_genes: int = 700, chunk: int = 20_000
) -> int:
    """Write ``n_cells`` synthetic cells to ``path`` (CSR, in chunks); return the bytes of X."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem
    from scipy import sparse

    rng = np.random.default_rng(0)
    n_genes = len(genes)
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    ad.AnnData(obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    nbytes = 0
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            per_cell = rng.lognormal(np.log(median_genes), 0.5, rows).astype(int)
            per_cell = np.clip(per_cell, min(200, median_genes // 2), n_genes)
            indptr = np.concatenate([[0], np.cumsum(per_cell)])
            indices = np.concatenate(
                [np.sort(rng.choice(n_genes, k, replace=False)) for k in per_cell]
            ).astype(np.int32)
            data = rng.negative_binomial(2, 0.3, indptr[-1]).astype(np.float32) + 1
            block = sparse.csr_matrix((data, indices, indptr), shape=(rows, n_genes))
            nbytes += block.data.nbytes + block.indices.nbytes + block.indptr.nbytes
            if start == 0:
                write_elem(f, "X", block)
            else:
                sparse_dataset(f["X"]).append(block)
    return nbytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def measure(
    path: str, checkpoint: str, *, chunk_size: int, precision: str, warm_cells: int, trim: bool
) -> dict:
    """In a fresh process: warm up, then embed the backed file; memory figures in MiB."""
    import anndata as ad

    import scdlkit as sck

    backed = ad.read_h5ad(path, backed="r")
    kwargs = {"checkpoint": checkpoint, "device": "cpu", "precision": precision, "progress": False}
    warm = backed[: min(warm_cells, backed.n_obs)].to_memory()
    sck.tl.embed(warm, chunk_size=chunk_size, **kwargs)
    del warm
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    sck.tl.embed(backed, chunk_size=chunk_size, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    gc.collect()
    if trim:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = _status_kib("VmRSS")
    result_mib = backed.obsm["X_scgpt"].nbytes / 2**20
    return {
        "n_cells": backed.n_obs,
        "seconds": seconds,
        "cells_per_s": backed.n_obs / seconds,
        "rss_before_mib": before / 1024,
        "peak_growth_mib": (peak - before) / 1024,
        "retained_mib": (after - before) / 1024,
        "result_mib": result_mib,
    }


def run_child(path: Path, args: argparse.Namespace, *, env: dict | None = None, trim: bool = False):
    if args.in_process:  # for the test suite: quick, but the figures are not a fresh process's
        kwargs = {"chunk_size": args.chunk_size, "precision": args.precision}
        return measure(
            str(path), str(args.checkpoint), warm_cells=args.warm_cells, trim=trim, **kwargs
        )
    command = [sys.executable, __file__, "--child", str(path), str(args.checkpoint)]
    command += ["--chunk-size", str(args.chunk_size), "--precision", args.precision]
    command += ["--warm-cells", str(args.warm_cells)] + (["--trim"] if trim else [])
    out = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=None, help="cells of the first file (60,000)")
    p.add_argument("--chunk-size", type=int, default=None, help="default 5,000")
    p.add_argument("--precision", default="auto", help="'auto', 'fp32' or 'bf16'")
    p.add_argument("--warm-cells", type=int, default=None, help="cells of the warm-up (2,000)")
    p.add_argument("--median-genes", type=int, default=None, help="per cell (700)")
    p.add_argument("--checkpoint", type=Path, default=FIXTURE)
    p.add_argument("--diagnose", action="store_true", help="also runs that attribute the memory")
    p.add_argument("--workdir", default=None, help="where the .h5ad files go (kept)")
    p.add_argument("--quick", action="store_true", help="small files: a smoke run")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    small = {"n_cells": 600, "chunk_size": 200, "warm_cells": 100, "median_genes": 100}
    full = {"n_cells": 60_000, "chunk_size": 5000, "warm_cells": 2000, "median_genes": 700}
    for name, value in (small if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Write the files, measure each in a fresh process, print and return the table."""
    args = parse_args(argv)
    if args.child:
        path, checkpoint = args.child
        result = measure(
            path,
            checkpoint,
            chunk_size=args.chunk_size,
            precision=args.precision,
            warm_cells=args.warm_cells,
            trim=args.trim,
        )
        print(json.dumps(result))
        return ""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scdlkit-stream-"))
    workdir.mkdir(parents=True, exist_ok=True)
    genes = vocab_genes(args.checkpoint, N_GENES)
    runs = [("as shipped", {}, False)]
    if args.diagnose:
        runs += [
            ("oneDNN primitive cache off", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}, False),
            ("heap trimmed after the call", {}, True),
        ]
    lines = [
        f"chunk_size {args.chunk_size:,}, precision {args.precision}, checkpoint "
        f"{args.checkpoint.name if args.checkpoint != FIXTURE else 'tiny test fixture'}, "
        f"warm-up on {args.warm_cells:,} cells; MiB",
        "",
        "| cells | CSR size | run | cells/s | peak growth | retained after | results |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_cells in (args.n_cells, 2 * args.n_cells):
        path = workdir / f"stream_{n_cells}_{args.median_genes}.h5ad"
        nbytes_path = path.with_suffix(".bytes")
        if not path.exists() or not nbytes_path.exists():
            nbytes = write_backed(path, n_cells, genes, median_genes=args.median_genes)
            nbytes_path.write_text(str(nbytes))
        csr_mib = int(nbytes_path.read_text()) / 2**20
        for label, env, trim in runs:
            r = run_child(path, args, env=env, trim=trim)
            lines.append(
                f"| {n_cells:,} | {csr_mib:,.0f} | {label} | {r['cells_per_s']:,.0f} | "
                f"{r['peak_growth_mib']:.0f} | {r['retained_mib']:.0f} | {r['result_mib']:.0f} |"
            )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
