"""Label transfer as a CellTypist user does it: a model on every reference cell, then the query.

pbmc68k_reduced (``.raw``, ``bulk_labels``, plus ``--noise-genes`` uninformative genes as in
``baseline_vs_celltypist.py``) is split per seed into a reference (85%, stratified) and a query
(15%). On the same reference cells:

- ``sck.tl.adapt_annotation`` with its default strategies (frozen_probe, head, baseline) and the
  pretrained tiny fixture ``tests/data/scgpt-tiny-pbmc-pretrained``: it holds out cells of the
  reference to choose the winner, then (``refit="auto"``) fits the winner again on every
  reference cell when it is a closed-form strategy; ``refit="never"`` keeps the model fitted on
  the runner's training cells, for comparison. ``sck.tl.annotate`` labels the query.
- CellTypist itself: ``celltypist.train`` on the reference (defaults, ``use_SGD=False``),
  ``celltypist.annotate(mode="best match")`` on the query. CellTypist 1.7.1 cannot train with
  scikit-learn >= 1.8; run this script with an older scikit-learn on the path (for instance
  ``pip install --target /tmp/sk17 scikit-learn==1.7.2 --no-deps`` and ``PYTHONPATH=/tmp/sk17``).

Printed: the machine, then per seed the query macro-F1 and accuracy of each, the winner and what
its saved model was fitted on, and the mean +- sd over seeds. Query cells are only reported.

Run: ``python benchmarks/refit_vs_celltypist.py [--seeds 0 1 2] [--noise-genes 10000]
[--strategies frozen_probe head baseline] [--n-repeats 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from baseline_vs_celltypist import (
    _anndata,
    load_celltypist,
    machine,
    noisy_pbmc,
)

CHECKPOINT = (
    Path(__file__).resolve().parents[1]
    / "tests"
    / "data"
    / "scgpt-tiny-pbmc-pretrained"
    / "checkpoint"
)


def reference_query(labels: np.ndarray, seed: int, query_size: float) -> tuple[np.ndarray, ...]:
    from scdlkit._shared.splits import stratified_split

    parts, _ = stratified_split(
        np.arange(len(labels)),
        labels,
        val_size=0.0,
        test_size=query_size,
        random_state=np.random.default_rng(seed),
    )
    return parts["train"], parts["test"]


def scdlkit_query_labels(
    reference,
    query,
    seed: int,
    refit: str,
    strategies: tuple[str, ...],
    n_repeats: int,
    calibration_size: float,
) -> tuple[np.ndarray, dict]:
    import scdlkit as sck

    ref = reference.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sck.tl.adapt_annotation(
            ref,
            "label",
            checkpoint=CHECKPOINT,
            strategies=strategies,
            n_repeats=n_repeats,
            calibration_size=calibration_size,
            random_state=seed,
            refit=refit,
            precision="fp32",
            progress=False,
        )
    record = ref.uns["scgpt_annotation"]
    runner = sck.AnnotationRunner.load(record["runner_dir"])
    q = query.copy()
    sck.tl.annotate(q, runner)
    final = dict(record["final_models"][record["best_strategy"]])
    return q.obs["scgpt_annotation"].astype(str).to_numpy(), {
        "winner": record["best_strategy"],
        **final,
    }


def one_seed(matrix, genes, labels: pd.Categorical, seed: int, celltypist, args):
    from sklearn.metrics import accuracy_score, f1_score

    codes = labels.codes.astype(np.int64)
    ref_cells, query_cells = reference_query(codes, seed, args.query_size)
    how = (tuple(args.strategies), args.n_repeats, args.calibration_size)
    names = np.asarray(labels.astype(str))
    reference = _anndata(matrix[ref_cells], genes)
    reference.obs["label"] = pd.Categorical(names[ref_cells])
    query = _anndata(matrix[query_cells], genes)
    truth = names[query_cells]
    row: dict = {"seed": seed, "reference cells": len(ref_cells), "query cells": len(truth)}

    def score(name: str, predicted: np.ndarray) -> None:
        row[f"{name} macro-F1"] = float(
            f1_score(truth, predicted, average="macro", labels=np.unique(truth), zero_division=0)
        )
        row[f"{name} accuracy"] = float(accuracy_score(truth, predicted))

    refit_labels, final = scdlkit_query_labels(reference, query, seed, "auto", *how)
    row["winner"] = final["winner"]
    row["saved model fitted on"] = f"{final['n_cells']} cells"
    score("scdlkit refit", refit_labels)
    score("scdlkit training split", scdlkit_query_labels(reference, query, seed, "never", *how)[0])
    if celltypist is not None:
        model = celltypist.train(reference, labels="label", check_expression=False, use_SGD=False)
        best = celltypist.annotate(query, model=model, mode="best match")
        score("CellTypist", best.predicted_labels["predicted_labels"].astype(str).to_numpy())
    return row


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-genes", type=int, default=10_000)
    parser.add_argument("--query-size", type=float, default=0.15)
    parser.add_argument("--celltypist", choices=("auto", "require", "off"), default="auto")
    parser.add_argument("--strategies", nargs="+", default=["frozen_probe", "head", "baseline"])
    parser.add_argument("--n-repeats", type=int, default=1, help="selection repeats")
    parser.add_argument(
        "--calibration-size",
        type=float,
        default=0.1,
        help="cells held out to calibrate error rates (0: the refit sees every reference cell)",
    )
    args = parser.parse_args(argv)
    celltypist, note = load_celltypist(args.celltypist)
    matrix, genes, labels = noisy_pbmc(args.noise_genes)
    rows = [one_seed(matrix, genes, labels, seed, celltypist, args) for seed in args.seeds]
    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c.endswith(("macro-F1", "accuracy"))]
    summary = {
        c: f"{statistics.mean(frame[c]):.3f} +- {statistics.stdev(frame[c]):.3f}"
        if len(frame) > 1
        else f"{frame[c].iloc[0]:.3f}"
        for c in numeric
    }
    lines = [
        f"machine: {machine()}",
        note,
        f"scdlkit strategies: {', '.join(args.strategies)}; n_repeats={args.n_repeats}; "
        f"calibration_size={args.calibration_size}",
        frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        "mean +- sd over seeds:",
        *[f"  {k}: {v}" for k, v in summary.items()],
    ]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
