"""Cost of the annotation pipeline against one embedding pass, and per-strategy results.

1. The default ``sck.tl.adapt_annotation`` call (``frozen_probe``, ``head``, ``baseline``) reuses
   one pass of frozen ``<cls>`` features for both scGPT strategies, so it should cost little more
   than one ``sck.tl.embed`` pass over the same cells (goal: within 1.5x). Measured on
   ``pbmc68k_reduced`` (700 cells) with a random checkpoint in the official layout,
   ``--size whole`` (whole-human: 12 layers, d=512) or ``--size mid`` (4 layers, d=256, 8 heads,
   d_hid 512); median of ``--repeats`` runs, with ``/proc/loadavg`` before and after (the
   machine may be shared) and each strategy's runtime.
2. Runtime and metrics of every strategy on ``pbmc68k_reduced`` with the tiny fixture checkpoint
   (random weights too: the metrics show the pipeline, not biology).

Run: ``python benchmarks/annotation_pipeline.py [--size mid] [--repeats 3] [--quick]``.
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
#: Random checkpoints of the pipeline-vs-embedding timing (``write_random_checkpoint`` sizes).
SIZES = {
    "whole": {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12},
    "mid": {"embsize": 256, "nheads": 8, "d_hid": 512, "nlayers": 4},
    "tiny": {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2},
}


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


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or ``n/a``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def timed(fn, repeats: int) -> tuple[float, list]:
    """Median wall time of ``repeats`` calls of ``fn``, and what each call returned."""
    times, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def pipeline_vs_embedding(adata, repeats: int, size: dict) -> list[str]:
    """Table rows: one ``sck.tl.embed`` pass, the default ``sck.tl.adapt_annotation`` call, and
    the default call's strategies (each charged for the shared ``<cls>`` pass it reads)."""
    import scdlkit as sck
    from scdlkit.demo import write_random_checkpoint

    def embed():
        sck.tl.embed(adata.copy(), checkpoint=ckpt, device="cpu", progress=False)

    def adapt():
        copy = adata.copy()
        sck.tl.adapt_annotation(copy, "bulk_labels", checkpoint=ckpt, device="cpu", progress=False)
        return copy.uns["scgpt_annotation"]["strategy_metrics"]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(Path(tmp) / "ckpt", list(adata.var_names), **size)
        embed()  # warm-up: imports, first-call kernel set-up
        before = loadavg()
        embed_s, _ = timed(embed, repeats)
        adapt_s, tables = timed(adapt, repeats)
        after = loadavg()
    rows = [
        f"| one embedding pass (sck.tl.embed) | {embed_s:.2f} s | 1.00x |",
        f"| default sck.tl.adapt_annotation | {adapt_s:.2f} s | {adapt_s / embed_s:.2f}x |",
    ]
    runtimes = [table.set_index("strategy")["runtime_sec"] for table in tables]
    for name in runtimes[0].index:
        seconds = statistics.median(float(r[name]) for r in runtimes)
        rows.append(f"| strategy {name} (runtime_sec) | {seconds:.2f} s | |")
    rows.append(f"\nload average (1, 5, 15 min): before {before}, after {after}")
    return rows


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
        "--size",
        choices=("whole", "mid"),
        default="whole",
        help="random checkpoint of the pipeline-vs-embedding timing: whole-human (12 layers, "
        "d=512) or mid (4 layers, d=256, 8 heads, d_hid 512)",
    )
    parser.add_argument(
        "--n-repeats", type=int, default=1, help="splits per strategy (mean ± sd when > 1)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=FIXTURE, help="checkpoint of the strategy table"
    )
    parser.add_argument(
        "--strategies-only", action="store_true", help="skip the pipeline-vs-embedding timing"
    )
    parser.add_argument(
        "--pipeline-only", action="store_true", help="only the pipeline-vs-embedding timing"
    )
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    adata = pbmc()
    size = SIZES[args.size]
    repeats = args.repeats
    if args.quick:
        size, repeats = SIZES["tiny"], 1
    print(f"machine: {machine()}")
    print(f"data: pbmc68k_reduced, {adata.n_obs} cells, {adata.n_vars} genes; median of {repeats}")
    print()
    if not args.strategies_only:
        print(
            f"model: {size['nlayers']} layers, d={size['embsize']}, {size['nheads']} heads, "
            f"d_hid {size['d_hid']} (random weights), CPU"
        )
        print("| run | time | vs embedding |")
        print("|---|---|---|")
        for line in pipeline_vs_embedding(adata, repeats, size):
            print(line)
        print()
    if args.pipeline_only:
        return 0
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
