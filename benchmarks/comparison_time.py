"""Wall time of the whole eight-strategy comparison, as a user runs it.

One ``sck.tl.adapt_annotation`` call with every strategy on pbmc68k_reduced (700 cells, ``.raw``,
``bulk_labels``) and the tiny fixture pretrained on those cells
(``tests/data/scgpt-tiny-pbmc-pretrained``), default settings, one split. Prints the machine, the
load average before and after (the machine may be shared), the wall time of the call and each
strategy's runtime and metrics (validation chooses; test is reported).

Run: ``python benchmarks/comparison_time.py [--threads N] [--strategies ...]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import anndata as ad

ROOT = Path(__file__).resolve().parents[1]
#: Test-cell columns of the conformal prediction sets, and their headers.
CONFORMAL = {
    "test_coverage": "coverage (target 0.90)",
    "test_set_size": "mean set size",
    "test_set_unknown_share": "unknown share",
    "test_ece": "ECE",
    "test_ece_scaled": "ECE scaled",
}
FIXTURE = ROOT / "tests" / "data" / "scgpt-tiny-pbmc-pretrained"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        native = sorted({f for f in ("avx512_bf16", "amx_bf16") if f in text})
        flags = ", ".join(native) if native else "no avx512_bf16/amx_bf16"
    except OSError:
        pass
    return f"{cpu} ({flags}), {os.cpu_count()} cores"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[0]
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    import torch

    import scdlkit as sck
    from scdlkit._shared.strategies import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(FIXTURE / "data.h5ad")
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: pbmc68k_reduced .raw, {adata.n_obs} cells, {adata.n_vars} genes")
    before = loadavg()
    start = time.perf_counter()
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=FIXTURE / "checkpoint",
        strategies=tuple(args.strategies),
        random_state=0,
        progress=False,
    )
    seconds = time.perf_counter() - start
    print(f"load average before {before}, after {loadavg()}")
    print(f"wall time of the call: {seconds:.1f} s ({seconds / 60:.2f} min)")
    metrics = adata.uns["scgpt_annotation"]["strategy_metrics"]
    print()
    conformal = [c for c in CONFORMAL if c in metrics.columns]
    header = ["strategy", "runtime s", "val macro-F1", "test macro-F1", "test accuracy"]
    header += [CONFORMAL[c] for c in conformal]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for _, row in metrics.iterrows():
        cells = [
            f"`{row['strategy']}`",
            f"{row['runtime_sec']:.1f}",
            f"{row['validation_macro_f1']:.3f}",
            f"{row['test_macro_f1']:.3f}",
            f"{row['test_accuracy']:.3f}",
            *[f"{row[c]:.3f}" for c in conformal],
        ]
        print("| " + " | ".join(cells) + " |")
    if conformal:
        split = adata.uns["scgpt_annotation"]["split"]
        print(
            f"\nprediction sets at error rate 0.1: {split['n_calibration']} calibration cells, "
            f"{split['n_test']} test cells"
        )
    print(f"\nbest (validation): {adata.uns['scgpt_annotation']['best_strategy']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
