"""Throughput of scdlkit's Geneformer tokenizer beside the official ``TranscriptomeTokenizer``.

Both tokenise the same synthetic cells: raw UMI-like counts (negative binomial, a log-normal number
of expressed genes per cell, realistic depth) over every gene of the V2 fixture's dictionaries
(``tests/data/geneformer-tiny-v2/dictionaries``, 1,500 genes) plus genes outside them, CSR
float32, ``obs["n_counts"]`` the row totals (float64), ``var["ensembl_id"]``. The AnnData is
written to a temporary ``.h5ad``, because the official tokenizer reads files from a folder.

- scdlkit: :func:`scdlkit.foundation.models.geneformer.tokenize_geneformer` on the in-memory
  AnnData, and again including ``anndata.read_h5ad`` of the same file; in this process.
- official (``--official SRC --official-python PY``): ``TranscriptomeTokenizer(...).tokenize_data(
  folder, out, prefix, file_format="h5ad")`` in a subprocess of ``PY`` (an environment with the
  official requirements: transformers 4.46, datasets, scanpy, anndata, loompy). ``SRC`` holds the
  exported official ``geneformer/tokenizer.py``; it is imported without running the package
  ``__init__`` (which imports modules needing ray, optuna, ...): a stand-in ``geneformer`` module
  defines the dictionary path constants, pointing at the fixture's dictionaries, which are also
  passed as the dictionary files. The official code is not changed: its ``tokenize_anndata``,
  ``create_dataset`` and the module's ``sum_ensembl_ids`` (which reads the ``.h5ad``) are wrapped
  by timers only, so one ``tokenize_data`` call gives the full time (ranking, building the
  Hugging Face dataset with truncation and ``<cls>``/``<eos>``, ``save_to_disk``) and its parts.

The first ``--check`` cells are compared: the official ``input_ids`` (read back from the saved
dataset) against scdlkit's tokens. Upstream orders genes of equal median-scaled value by an
unstable ``np.argsort``, scdlkit by token id, so inside a run of equal values the tokens are
compared as sets and everywhere else exactly.

Run ``python benchmarks/geneformer_tokenize.py --official /tmp/gf_official --official-python
/tmp/gfenv/bin/python`` (20,000 cells, 3 repeats: a few minutes on 2 CPU cores), or without
``--official`` for scdlkit alone. Medians over ``--repeats`` are reported; the CPU seconds of the
timed process are given too, as the wall clock moves when other programs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy
from scipy import sparse

from scdlkit.foundation.models.geneformer import load_geneformer_dictionaries, tokenize_geneformer

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "geneformer-tiny-v2"
DICTIONARIES = FIXTURE / "dictionaries"
TARGET_SUM = 10_000

# Runs in the official environment (``--official-python``); our own harness around the official
# TranscriptomeTokenizer. argv[1] is a JSON object of settings; the result is written as JSON.
OFFICIAL_RUNNER = r"""
import importlib, json, sys, time, types
from pathlib import Path
from importlib.metadata import version

cfg = json.loads(sys.argv[1])
pkg_dir = Path(cfg["src"]) / "geneformer"
dicts = Path(cfg["dict_dir"])
pkg = types.ModuleType("geneformer")
pkg.__path__ = [str(pkg_dir)]
pkg.__file__ = str(pkg_dir / "__init__.py")
# the dictionary path constants of the official geneformer/__init__.py
pkg.GENE_MEDIAN_FILE = dicts / "gene_median_dictionary_gc104M.pkl"
pkg.TOKEN_DICTIONARY_FILE = dicts / "token_dictionary_gc104M.pkl"
pkg.ENSEMBL_DICTIONARY_FILE = dicts / "gene_name_id_dict_gc104M.pkl"
pkg.ENSEMBL_MAPPING_FILE = dicts / "ensembl_mapping_dict_gc104M.pkl"
unused = dicts / "V1-dictionaries-not-used"
pkg.GENE_MEDIAN_FILE_30M = unused / "gene_median_dictionary_gc30M.pkl"
pkg.TOKEN_DICTIONARY_FILE_30M = unused / "token_dictionary_gc30M.pkl"
pkg.ENSEMBL_DICTIONARY_FILE_30M = unused / "gene_name_id_dict_gc30M.pkl"
pkg.ENSEMBL_MAPPING_FILE_30M = unused / "ensembl_mapping_dict_gc30M.pkl"
sys.modules["geneformer"] = pkg

import datasets

datasets.disable_progress_bars()
tokenizer = importlib.import_module("geneformer.tokenizer")

timers = {}


def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        timers[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return out

    return wrapper


tk = tokenizer.TranscriptomeTokenizer(
    model_input_size=cfg["model_input_size"],
    special_token=True,
    model_version="V2",
    gene_median_file=pkg.GENE_MEDIAN_FILE,
    token_dictionary_file=pkg.TOKEN_DICTIONARY_FILE,
    gene_mapping_file=pkg.ENSEMBL_MAPPING_FILE,
)
# timers only: the official methods run unchanged
tokenizer.sum_ensembl_ids = timed("read", tokenizer.sum_ensembl_ids)
tk.tokenize_anndata = timed("tokenize_anndata", tk.tokenize_anndata)
tk.create_dataset = timed("create_dataset", tk.create_dataset)

runs = []
out_root = Path(cfg["out_dir"])
for r in range(cfg["repeats"]):
    out = out_root / f"rep{r}"
    timers.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    tk.tokenize_data(cfg["data_dir"], out, "bench", file_format="h5ad")
    timers["tokenize_data"] = (time.perf_counter() - t0, time.process_time() - c0)
    runs.append(dict(timers))
    if r < cfg["repeats"] - 1:
        import shutil

        shutil.rmtree(out)
ds = datasets.load_from_disk(str(out / "bench.dataset"))
first = ds.select(range(min(cfg["check"], len(ds))))["input_ids"]
result = {
    "runs": runs,
    "n_rows": len(ds),
    "input_ids": [[int(t) for t in ids] for ids in first],
    "versions": {
        p: version(p) for p in ("numpy", "scipy", "anndata", "scanpy", "datasets", "transformers")
    },
}
Path(cfg["result"]).write_text(json.dumps(result))
"""


# ---------------------------------------------------------------------------------------------
# data


def synthetic_counts(
    n_cells: int,
    dictionary_genes: list[str],
    n_outside: int,
    *,
    median_expressed: int,
    median_depth: float,
    seed: int,
) -> ad.AnnData:
    """Raw UMI-like counts over ``dictionary_genes`` plus ``n_outside`` genes not in any dictionary.

    Per cell, a log-normal number of expressed genes (median ``median_expressed``), drawn without
    replacement with gene popularity (Gumbel top-k over log-normal gene abundances); each count is
    ``1 + NegBin(r=2, mean)`` with the mean proportional to the gene's abundance and to a
    log-normal cell depth, scaled so the median cell totals about ``median_depth`` UMIs.
    """
    rng = np.random.default_rng(seed)
    outside = [f"ENSG9{i:010d}" for i in range(n_outside)]  # valid-looking, in no dictionary
    names = np.array(dictionary_genes + outside, dtype=object)[
        rng.permutation(len(dictionary_genes) + n_outside)
    ]
    n_genes = len(names)
    abundance = rng.lognormal(0.0, 1.2, n_genes)
    log_w = np.log(abundance)
    n_expr = np.round(rng.lognormal(np.log(median_expressed), 0.3, n_cells))
    n_expr = np.clip(n_expr, 200, n_genes - 1).astype(np.int64)
    # mean count per expressed gene before the +1, so a median cell holds about median_depth
    base = max(median_depth / median_expressed - 1.0, 0.1)
    depth = rng.lognormal(0.0, 0.3, n_cells)

    rows, cols, vals = [], [], []
    step = 1024
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        keys = log_w + rng.gumbel(size=(stop - start, n_genes))
        kth = -np.sort(-keys, axis=1)[np.arange(stop - start), n_expr[start:stop] - 1]
        r, c = np.nonzero(keys >= kth[:, None])
        w = abundance[c] / abundance[c].mean()
        mean = base * depth[start + r] * w
        counts = 1 + rng.negative_binomial(2, 2.0 / (2.0 + mean))
        rows.append(r + start)
        cols.append(c)
        vals.append(counts.astype(np.float32))
    x = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, n_genes),
        dtype=np.float32,
    )
    x.sort_indices()
    obs = pd.DataFrame(
        {"n_counts": np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()},
        index=pd.Index([f"cell{i:06d}" for i in range(n_cells)], dtype=str),
    )
    var = pd.DataFrame({"ensembl_id": names.astype(str)}, index=pd.Index(names.astype(str)))
    return ad.AnnData(X=x, obs=obs, var=var)


# ---------------------------------------------------------------------------------------------
# timing


def _time(fn: Any) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def time_scdlkit(adata: ad.AnnData, path: Path, dicts: Any, size: int, repeats: int) -> dict:
    def in_memory() -> Any:
        return tokenize_geneformer(adata, dicts, gene_key="ensembl_id", model_input_size=size)

    def from_file() -> Any:
        data = ad.read_h5ad(path)
        return tokenize_geneformer(data, dicts, gene_key="ensembl_id", model_input_size=size)

    in_memory()  # warm-up (imports, first allocations)
    runs: dict[str, list[tuple[float, float]]] = {"memory": [], "file": []}
    tokens = None
    for _ in range(repeats):
        wall, cpu, (tokens, _match) = _time(in_memory)
        runs["memory"].append((wall, cpu))
        wall, cpu, _ = _time(from_file)
        runs["file"].append((wall, cpu))
    return {"runs": runs, "tokens": tokens}


def run_official(
    src: Path, python: str, data_dir: Path, out_dir: Path, size: int, repeats: int, check: int
) -> dict:
    result = out_dir / "official.json"
    cfg = {
        "src": str(src),
        "dict_dir": str(DICTIONARIES),
        "data_dir": str(data_dir),
        "out_dir": str(out_dir / "official"),
        "model_input_size": size,
        "repeats": repeats,
        "check": check,
        "result": str(result),
    }
    env = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [python, "-c", OFFICIAL_RUNNER, json.dumps(cfg)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        msg = f"the official tokenizer failed (exit {proc.returncode})"
        raise SystemExit(msg)
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# like-for-like check


def compare(
    official: list[list[int]], tokens: Any, adata: ad.AnnData, dicts: Any, limit: int
) -> dict:
    """Official ``input_ids`` against scdlkit's, equal up to the order inside runs of ties."""
    token_of = dicts.token_ids
    medians = dicts.medians
    genes = adata.var["ensembl_id"].to_numpy()
    x = adata.X[: len(official)].tocsr()
    n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)
    exact = tie_equal = with_ties = 0
    bad: list[str] = []
    for i, theirs in enumerate(official):
        ours = tokens.cell(i).tolist()
        row = slice(x.indptr[i], x.indptr[i + 1])
        value: dict[int, float] = {}
        for j, c in zip(x.indices[row], x.data[row].astype(np.float64), strict=True):
            if genes[j] in token_of:
                # upstream's arithmetic, in its order
                value[token_of[genes[j]]] = c / n_counts[i] * TARGET_SUM / medians[genes[j]]
        if ours == theirs:
            exact += 1
        ok = len(ours) == len(theirs) and ours[:1] == theirs[:1] and ours[-1:] == theirs[-1:]
        if ok:
            a, b = ours[1:-1], theirs[1:-1]
            va = np.array([value[t] for t in a])
            vb = np.array([value[t] for t in b])
            ok = np.array_equal(va, vb) and bool(np.all(np.diff(va) <= 0))
        if ok:
            bounds = np.flatnonzero(np.diff(va) != 0) + 1
            starts, stops = np.r_[0, bounds], np.r_[bounds, len(va)]
            with_ties += bool(np.any(stops - starts > 1))
            truncated = tokens.n_expressed[i] > limit
            for s, e in zip(starts, stops, strict=True):
                sa, sb = set(a[s:e]), set(b[s:e])
                if truncated and e == len(va):  # a tie cut by truncation: any of its genes
                    pool = {t for t, v in value.items() if v == va[s]}
                    ok = ok and sa <= pool and sb <= pool
                else:
                    ok = ok and sa == sb
        if ok:
            tie_equal += 1
        else:
            bad.append(str(adata.obs_names[i]))
    return {
        "cells": len(official),
        "exact": exact,
        "equal_modulo_ties": tie_equal,
        "cells_with_ties": with_ties,
        "differing": bad,
    }


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    bf16 = sorted({f for f in ("avx512_bf16", "amx_bf16") if f in text.split()})
    flags = ", ".join(bf16) if bf16 else "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "bf16": flags, "cores": str(cores)}


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def table(rows: list[tuple[str, int, list[tuple[float, float]]]]) -> str:
    lines = [
        "| tokenizer | cells | repeats | median s | median CPU s | cells/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, cells, runs in rows:
        wall, cpu = _median(runs)
        lines.append(
            f"| {name} | {cells:,} | {len(runs)} | {wall:.2f} | {cpu:.2f} | {cells / wall:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000, help="cells (default 20,000)")
    parser.add_argument(
        "--outside-genes", type=int, default=500, help="genes in no dictionary (default 500)"
    )
    parser.add_argument(
        "--median-expressed", type=int, default=1_200, help="median expressed genes per cell"
    )
    parser.add_argument("--median-depth", type=float, default=6_000, help="median UMIs per cell")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument(
        "--model-input-size", type=int, default=4096, help="V2 model_input_size (default 4096)"
    )
    parser.add_argument("--check", type=int, default=200, help="cells compared (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--official", type=Path, help="folder holding the official geneformer/tokenizer.py"
    )
    parser.add_argument("--official-python", help="python of an environment for the official code")
    parser.add_argument("--tmp", type=Path, help="folder for the .h5ad and datasets (temporary)")
    args = parser.parse_args(argv)
    if (args.official is None) != (args.official_python is None):
        parser.error("--official and --official-python go together")
    if args.repeats < 1 or args.cells < 1:
        parser.error("--repeats and --cells must be positive")

    dicts = load_geneformer_dictionaries(DICTIONARIES)
    with (DICTIONARIES / "token_dictionary_gc104M.pkl").open("rb") as f:
        dictionary_genes = [g for g in pickle.load(f) if not g.startswith("<")]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    adata = synthetic_counts(
        args.cells,
        dictionary_genes,
        args.outside_genes,
        median_expressed=args.median_expressed,
        median_depth=args.median_depth,
        seed=args.seed,
    )
    nnz = np.diff(adata.X.indptr)
    in_dict = adata.var["ensembl_id"].isin(set(dicts.token_ids)).to_numpy()
    dict_nnz = np.diff(adata.X[:, in_dict].tocsr().indptr)
    print(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes ({int(in_dict.sum()):,} in the "
        f"dictionary); expressed genes per cell median {int(np.median(nnz)):,} "
        f"({int(nnz.min()):,}-{int(nnz.max()):,}), of them in the dictionary median "
        f"{int(np.median(dict_nnz)):,}; UMIs per cell median "
        f"{int(np.median(adata.obs['n_counts'])):,}; made in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="gf_tokenize_") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        data_dir.mkdir()
        path = data_dir / "cells.h5ad"
        adata.write_h5ad(path)
        print(f"h5ad: {path.stat().st_size / 2**20:,.0f} MiB", flush=True)

        ours = time_scdlkit(adata, path, dicts, args.model_input_size, args.repeats)
        rows = [
            (
                "scdlkit `tokenize_geneformer`, in-memory AnnData",
                args.cells,
                ours["runs"]["memory"],
            ),
            ("scdlkit `read_h5ad` + `tokenize_geneformer`", args.cells, ours["runs"]["file"]),
        ]
        versions = {
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "anndata": version("anndata"),
        }
        official = None
        if args.official is not None:
            official = run_official(
                args.official,
                args.official_python,
                data_dir,
                tmp,
                args.model_input_size,
                args.repeats,
                args.check,
            )
            if official["n_rows"] != args.cells:
                print(f"official dataset has {official['n_rows']} rows, not {args.cells}")
            runs = official["runs"]

            def part(name: str, minus: str | None = None) -> list[tuple[float, float]]:
                if minus is None:
                    return [tuple(r[name]) for r in runs]
                return [(r[name][0] - r[minus][0], r[name][1] - r[minus][1]) for r in runs]

            rows += [
                (
                    "official `tokenize_anndata` without reading the h5ad",
                    args.cells,
                    part("tokenize_anndata", "read"),
                ),
                (
                    "official `tokenize_anndata` (reads the h5ad)",
                    args.cells,
                    part("tokenize_anndata"),
                ),
                (
                    "official `tokenize_data` (also builds and saves the dataset)",
                    args.cells,
                    part("tokenize_data"),
                ),
            ]
            rest = [
                tuple(
                    r["tokenize_data"][k] - r["tokenize_anndata"][k] - r["create_dataset"][k]
                    for k in (0, 1)
                )
                for r in runs
            ]
            parts = {
                "h5ad read (sum_ensembl_ids)": part("read"),
                "ranking": part("tokenize_anndata", "read"),
                "create_dataset": part("create_dataset"),
                "save_to_disk and the rest": rest,
            }
            print(
                "official parts, median wall / CPU s: "
                + "; ".join("{} {:.2f} / {:.2f}".format(k, *_median(v)) for k, v in parts.items())
            )

    load_after = os.getloadavg()[0]
    m = machine()
    print()
    print(table(rows))
    print()
    print(
        f"Machine: {m['cpu']}, native bf16: {m['bf16']}, {m['cores']} cores, Python "
        f"{platform.python_version()}; scdlkit side numpy {versions['numpy']}, scipy "
        f"{versions['scipy']}, anndata {versions['anndata']}"
        + (
            "; official side " + ", ".join(f"{k} {v}" for k, v in official["versions"].items())
            if official
            else ""
        )
        + f"; load average {load_before:.2f} before, {load_after:.2f} after."
    )
    if official is not None:
        limit = args.model_input_size - 2
        res = compare(official["input_ids"], ours["tokens"], adata, dicts, limit)
        print(
            f"Check, first {res['cells']} cells: {res['equal_modulo_ties']} equal modulo tie "
            f"order ({res['exact']} identical, {res['cells_with_ties']} with ties); differing: "
            f"{res['differing'][:10] or 'none'}"
        )
        if res["differing"]:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
