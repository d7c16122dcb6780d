"""Cost of the annotation pipeline against one embedding pass, and per-strategy results.

1. The default ``adapt_annotation`` run (``frozen_probe`` + ``head``) reuses one pass of frozen
   ``<cls>`` features for both strategies, so it should cost little more than embedding the same
   cells once. Measured with a whole-human-sized scGPT (random weights: 12 layers, d=512) on
   ``pbmc68k_reduced`` (700 cells); median of ``--repeats`` runs.
2. Runtime and metrics of every strategy on ``pbmc68k_reduced`` with the tiny fixture checkpoint
   (random weights too: the metrics show the pipeline, not biology).

Run: ``python benchmarks/annotation_pipeline.py [--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

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
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def pbmc():
    import scanpy as sc

    data = sc.datasets.pbmc68k_reduced()
    adata = data.raw.to_adata()
    adata.obs["bulk_labels"] = data.obs["bulk_labels"].copy()
    return adata


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipeline_vs_embedding(adata, repeats: int, size: dict) -> list[str]:
    import scdlkit as sck
    from scdlkit.demo import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", list(adata.var_names), **size)
        embed = timed(
            lambda: sck.tl.embed(adata.copy(), checkpoint=ckpt, device="cpu", progress=False),
            repeats,
        )
        fit = timed(
            lambda: sck.AnnotationRunner(
                label_key="bulk_labels", checkpoint=ckpt, device="cpu", progress=False
            ).fit(adata),
            repeats,
        )
    ratio = fit / embed
    return [
        f"| one embedding pass (sck.tl.embed) | {embed:.1f} s | 1.00x |",
        f"| default adapt (frozen_probe + head) | {fit:.1f} s | {ratio:.2f}x |",
    ]


def per_strategy(
    adata, epochs: int | None, n_repeats: int = 1, checkpoint: Path = FIXTURE
) -> list[str]:
    import scdlkit as sck
    from scdlkit.foundation import STRATEGIES

    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint,
        strategies=STRATEGIES,
        device="cpu",
        epochs=epochs,
        attention_dropout=0.0,
        n_repeats=n_repeats,
        precision="fp32",
        progress=False,
    ).fit(adata)

    def spread(row: dict, column: str) -> str:
        if f"{column}_sd" in row:
            return f"{row[column]:.3f} ± {row[column + '_sd']:.3f}"
        if f"{column}_ci_low" in row:
            return (
                f"{row[column]:.3f} [{row[column + '_ci_low']:.3f}, {row[column + '_ci_high']:.3f}]"
            )
        return f"{row[column]:.3f}"

    rows = []
    for row in runner.strategy_metrics_.to_dict(orient="records"):
        best = " (best)" if row["strategy"] == runner.best_strategy_ else ""
        vs = row.get("test_macro_f1_vs_baseline", float("nan"))
        rows.append(
            f"| {row['strategy']}{best} | {row['runtime_sec']:.1f} | "
            f"{spread(row, 'validation_macro_f1')} | {spread(row, 'test_macro_f1')} | "
            f"{spread(row, 'test_accuracy')} | {vs:+.3f} | {row['trainable_parameters']:,} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trained strategy")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (smoke run)")
    parser.add_argument(
        "--n-repeats", type=int, default=1, help="splits per strategy (mean ± sd when > 1)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=FIXTURE, help="checkpoint of the strategy table"
    )
    parser.add_argument(
        "--strategies-only", action="store_true", help="skip the pipeline-vs-embedding timing"
    )
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    adata = pbmc()
    size = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12}
    repeats = args.repeats
    if args.quick:
        size, repeats = {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2}, 1
    print(f"machine: {machine()}")
    print(f"data: pbmc68k_reduced, {adata.n_obs} cells, {adata.n_vars} genes; median of {repeats}")
    print()
    if not args.strategies_only:
        print(f"model: {size['nlayers']} layers, d={size['embsize']} (random weights)")
        print("| run | time | vs embedding |")
        print("|---|---|---|")
        for line in pipeline_vs_embedding(adata, repeats, size):
            print(line)
        print()
    print(
        f"strategies on pbmc68k_reduced, {args.checkpoint.parent.name} checkpoint, CPU, fp32, "
        f"{args.n_repeats} split(s)"
    )
    header = ("strategy", "runtime s", "val macro-F1", "test macro-F1", "test accuracy")
    print("| " + " | ".join((*header, "test F1 vs baseline", "trainable")) + " |")
    print("|---|---|---|---|---|---|---|")
    epochs = 1 if args.quick else args.epochs
    for line in per_strategy(adata, epochs, args.n_repeats, args.checkpoint):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
