"""scGPT and Geneformer compared on pbmc68k in one call, over several seeds.

    python benchmarks/two_models_pbmc.py [--seeds 0 1 2] [--strategies head lora ...]

Both checkpoints are the tiny test fixtures (``tests/data``): scGPT's is pretrained on pbmc68k
with scGPT's own objectives (its ``<cls>`` knows cell identity), Geneformer's has random weights
(it knows nothing). The table shows what the comparison reports, not what real checkpoints would
reach. pbmc68k_reduced's counts are recovered from its ``.raw`` (``expm1(x) * n_counts / 1e4``):
Geneformer reads raw counts only. Each seed draws its own split (the same for both models);
validation decides, test cells are reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

import scdlkit as sck

sys.path.insert(0, str(Path(__file__).parent))
from baseline_vs_celltypist import machine

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CHECKPOINTS = {
    "scgpt": DATA / "scgpt-tiny-pbmc-pretrained" / "checkpoint",
    "geneformer": DATA / "geneformer-tiny-v2" / "checkpoint",
}


def pbmc_counts() -> ad.AnnData:
    """pbmc68k_reduced with the integer counts its ``.raw`` was normalised from."""
    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    scale = pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = np.rint(np.expm1(raw.X.toarray()) * scale).astype(np.float32)
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pbmc.obs[["bulk_labels", "n_counts"]].copy(),
        var=pd.DataFrame(index=raw.var_names),
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--strategies", nargs="+", default=["frozen_probe", "head", "lora", "baseline"]
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: each recipe's")
    args = parser.parse_args(argv)
    adata = pbmc_counts()
    rows, seconds = [], []
    for seed in args.seeds:
        run = adata.copy()
        start = time.perf_counter()
        extra = {} if args.epochs is None else {"epochs": args.epochs}
        sck.tl.adapt_annotation(
            run,
            "bulk_labels",
            checkpoint=list(CHECKPOINTS.values()),
            strategies=tuple(args.strategies),
            random_state=seed,
            device="cpu",
            precision="fp32",
            progress=False,
            **extra,
        )
        seconds.append(time.perf_counter() - start)
        uns = run.uns["scgpt_annotation"]
        metrics = pd.DataFrame(uns["strategy_metrics"])
        metrics["seed"] = seed
        metrics["kept"] = (metrics["strategy"] == uns["best_strategy"]) & (
            (metrics["model"] == uns["model"]) | (metrics["model"] == "expression")
        )
        rows.append(metrics)
    table = pd.concat(rows, ignore_index=True)
    summary = table.groupby(["model", "strategy"], sort=False).agg(
        validation=("validation_macro_f1", "mean"),
        validation_sd=("validation_macro_f1", "std"),
        test=("test_macro_f1", "mean"),
        test_sd=("test_macro_f1", "std"),
        kept=("kept", "sum"),
    )
    lines = [
        f"pbmc68k_reduced (700 cells, 10 bulk_labels), seeds {args.seeds}; machine: {machine()}; "
        "fp32",
        "",
        "| model | strategy | validation macro-F1 | test macro-F1 | kept (of seeds) |",
        "|---|---|---|---|---|",
    ]
    for (model, strategy), r in summary.iterrows():
        lines.append(
            f"| {model} | {strategy} | {r.validation:.3f} ± {r.validation_sd:.3f} | "
            f"{r.test:.3f} ± {r.test_sd:.3f} | {int(r.kept)} |"
        )
    lines.append("")
    lines.append(f"Median wall time per call: {np.median(seconds):.0f} s (2 CPU threads).")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
