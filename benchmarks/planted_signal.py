"""Can every strategy learn under its defaults? Planted-signal data and the pretrained fixture.

1. Planted signal (issue 19): 600 cells over 600 genes of the tiny fixture's vocabulary, 6 classes,
   each marked by 6 genes expressed high (log1p of lognormal(2.5, 0.3)) on a random background of
   120 genes (log1p of lognormal(0, 0.8)); the tiny random fixture; default settings.
2. pbmc68k_reduced (``.raw``, ``bulk_labels``) with the tiny fixture pretrained on those cells
   (``scgpt-tiny-pbmc-pretrained``): every encoder-trained strategy should reach at least
   frozen_probe's test macro-F1 minus 0.05.

Usage: ``python benchmarks/planted_signal.py [--strategies ...] [--seeds 0 1 2]``. Prints one table
per data set (fp32, so the numbers mean the same on every CPU) and names the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scdlkit._shared.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
RANDOM_CHECKPOINT = ROOT / "tests" / "data" / "scgpt-tiny-flash" / "checkpoint"
PRETRAINED = ROOT / "tests" / "data" / "scgpt-tiny-pbmc-pretrained"


def planted_signal_adata(
    checkpoint: Path = RANDOM_CHECKPOINT,
    *,
    n_cells: int = 600,
    n_genes: int = 600,
    n_classes: int = 6,
    n_markers: int = 6,
    n_background: int = 120,
    seed: int = 0,
) -> ad.AnnData:
    """Cells whose class is written in a few marker genes (``obs["cell_type"]``)."""
    rng = np.random.default_rng(seed)
    vocab = json.loads((Path(checkpoint) / "vocab.json").read_text())
    genes = sorted(g for g in vocab if not g.startswith("<"))
    genes = list(rng.choice(genes, size=n_genes, replace=False))
    labels = np.repeat(np.arange(n_classes), n_cells // n_classes)
    markers = rng.choice(n_genes, size=(n_classes, n_markers), replace=False)
    x = np.zeros((len(labels), n_genes), dtype=np.float32)
    for i, c in enumerate(labels):
        background = rng.choice(n_genes, size=n_background, replace=False)
        x[i, background] = np.log1p(rng.lognormal(0.0, 0.8, size=n_background))
        x[i, markers[c]] = np.log1p(rng.lognormal(2.5, 0.3, size=n_markers))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{c}" for c in labels])},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def pbmc_adata() -> ad.AnnData:
    return ad.read_h5ad(PRETRAINED / "data.h5ad")


def run(adata: ad.AnnData, label_key: str, checkpoint: Path, strategy: str, seed: int) -> dict:
    from scdlkit.foundation import ScGPTAnnotationRunner

    start = time.perf_counter()
    runner = ScGPTAnnotationRunner(
        label_key=label_key,
        checkpoint=checkpoint,
        strategies=(strategy,),
        random_state=seed,
        precision="fp32",
        progress=False,
    ).fit(adata)
    row = runner.strategy_metrics_.iloc[0]
    trainer = (runner.results_[strategy].training or {}).get("trainer", {})
    history = runner.history_.get(strategy)
    out = {
        "strategy": strategy,
        "seed": seed,
        "test_accuracy": row["test_accuracy"],
        "test_macro_f1": row["test_macro_f1"],
        "epochs_run": len(history) if history is not None else 0,
        "epoch_budget": trainer.get("epochs", ""),
        "seconds": time.perf_counter() - start,
    }
    print(
        "  "
        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()),
        flush=True,
    )
    return out


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.groupby("strategy", sort=False).agg(
        test_accuracy=("test_accuracy", "mean"),
        test_accuracy_sd=("test_accuracy", "std"),
        test_macro_f1=("test_macro_f1", "mean"),
        test_macro_f1_sd=("test_macro_f1", "std"),
        epochs_run=("epochs_run", "median"),
        epoch_budget=("epoch_budget", "first"),
        seconds=("seconds", "median"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", choices=("planted", "pbmc", "both"), default="both")
    args = parser.parse_args(argv)
    from scdlkit._shared.hardware import native_bf16

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"native bf16: {native_bf16('cpu')}; precision fp32"
    )
    pd.set_option("display.width", 160)
    if args.data in {"planted", "both"}:
        adata = planted_signal_adata()
        rows = [
            run(adata, "cell_type", RANDOM_CHECKPOINT, s, seed)
            for seed in args.seeds
            for s in args.strategies
        ]
        print("\nplanted signal, tiny random fixture (goal: test accuracy >= 0.8)")
        print(table(rows).round(3).to_string())
    if args.data in {"pbmc", "both"}:
        adata = pbmc_adata()
        rows = [
            run(adata, "bulk_labels", PRETRAINED / "checkpoint", s, seed)
            for seed in args.seeds
            for s in args.strategies
        ]
        frame = table(rows)
        print("\npbmc68k_reduced, pretrained tiny fixture (goal: >= frozen_probe macro-F1 - 0.05)")
        print(frame.round(3).to_string())


if __name__ == "__main__":
    main()
