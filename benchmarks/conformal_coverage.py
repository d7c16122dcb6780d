"""Do the prediction sets cover what they say? Coverage of ``error_rate=0.1`` on held-out cells.

Planted-signal data (``planted_signal.planted_signal_adata``; 3,000 cells, 6 classes, each marked
by ``--n-markers`` genes at lognormal(``--marker-mean``, 0.3) on a lognormal(0, 0.8) background,
so that the classifiers are good but not perfect) and the tiny random fixture. Per seed, one
``sck.AnnotationRunner`` fits ``--strategies`` with ``test_size=0.4`` (about 200 test cells per
class), ``val_size=0.1`` and ``calibration_size=0.15``; every strategy's sets are calibrated on
the calibration cells and measured on the test cells. Printed per strategy, mean +- sd over
seeds:

1. ``cells``: empirical test coverage at error rate 0.1 (target 0.90), per-class coverage (the
   worst class's mean over seeds), mean set size, share of cells whose set is not one class,
   expected calibration error before and after temperature scaling.
2. ``donors``: the same cells as ``--donors`` synthetic donors (3 by default, equal shares),
   each donor's expression multiplied gene by gene by its own lognormal(0, ``--donor-shift``)
   factor; training and validation cells from the first donor, calibration on the middle ones
   (``calibration_batches``), test on the last (``split_by="batch"``): coverage for a donor the
   model and calibration never saw.
3. ``unseen``: the reference lacks one class (``type5``); its cells are labelled by
   ``sck.tl.annotate(error_rate=0.1)``; printed: the share of them left unknown (set not one
   class) and the share with an empty set. Nothing guarantees either.

Run: ``python benchmarks/conformal_coverage.py [--seeds 0 1 2 3 4] [--strategies baseline head
lora] [--parts cells donors unseen]``; fp32, the machine named.
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
from baseline_vs_celltypist import machine
from planted_signal import RANDOM_CHECKPOINT, planted_signal_adata

ERROR_RATE = 0.1  # the error rate strategy_metrics_ reports its prediction-set columns at
#: Printed name of each column of the runner's strategy_metrics_.
COLUMNS = {
    "macro-F1": "test_macro_f1",
    "coverage": "test_coverage",
    "set size": "test_set_size",
    "unknown share": "test_set_unknown_share",
    "ECE": "test_ece",
    "ECE scaled": "test_ece_scaled",
}
FAST = {"progress": False, "precision": "fp32"}


def data(seed: int, args: argparse.Namespace):
    return planted_signal_adata(
        n_cells=args.n_cells, n_markers=args.n_markers, marker_mean=args.marker_mean, seed=seed
    )


def set_rows(runner, seed: int, part: str) -> list[dict]:
    """Per strategy: the runner's own coverage, set size, unknown share and ECE columns (at
    error rate 0.1), and the coverage of each class with at least 200 test cells."""
    test = runner.split_.test_indices
    labels = runner.prepared_.label_codes[test]
    metrics = runner.strategy_metrics_.set_index("strategy")
    rows = []
    for name, result in runner.results_.items():
        sets = result.extra["conformal"].prediction_sets(
            result.extra["test_probabilities"], ERROR_RATE
        )
        covered = sets[np.arange(len(labels)), labels]
        rows.append(
            {
                "part": part,
                "seed": seed,
                "strategy": name,
                "test cells": len(labels),
                "calibration cells": len(runner.split_.calibration_indices),
                **{label: float(metrics.loc[name, column]) for label, column in COLUMNS.items()},
                "per-class coverage": {
                    runner.label_categories_[c]: float(covered[labels == c].mean())
                    for c in np.unique(labels)
                    if (labels == c).sum() >= 200
                },
            }
        )
    return rows


def cells_part(seed: int, args: argparse.Namespace) -> list[dict]:
    import scdlkit as sck

    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=RANDOM_CHECKPOINT,
        strategies=tuple(args.strategies),
        test_size=0.4,
        val_size=0.1,
        calibration_size=0.15,
        random_state=seed,
        **FAST,
    ).fit(data(seed, args))
    return set_rows(runner, seed, "cells")


def donors_part(seed: int, args: argparse.Namespace) -> list[dict]:
    import scdlkit as sck

    adata = data(seed, args)
    rng = np.random.default_rng([seed, 1])
    names = "ABCDEFGH"[: args.donors]
    donor = np.array(list(names))[rng.permutation(adata.n_obs) % len(names)]
    counts = np.expm1(adata.X)
    for name in names:
        factor = rng.lognormal(0.0, args.donor_shift, size=adata.n_vars).astype(np.float32)
        counts[donor == name] *= factor
    adata.X = np.log1p(counts)
    adata.obs["donor"] = pd.Categorical(donor)
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=RANDOM_CHECKPOINT,
        strategies=tuple(args.strategies),
        batch_key="donor",
        split_by="batch",
        test_batches=[names[-1]],
        calibration_batches=list(names[1:-1]),
        val_size=0.15,
        random_state=seed,
        **FAST,
    ).fit(adata)
    return set_rows(runner, seed, "donors")


def unseen_part(seed: int, args: argparse.Namespace) -> list[dict]:
    import scdlkit as sck

    adata = data(seed, args)
    unseen = "type5"
    is_unseen = (adata.obs["cell_type"] == unseen).to_numpy()
    reference = adata[~is_unseen].copy()
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.remove_unused_categories()
    query = adata[is_unseen].copy()
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=RANDOM_CHECKPOINT,
        strategies=tuple(args.strategies),
        keep="all",
        val_size=0.1,
        test_size=0.2,
        calibration_size=0.15,
        random_state=seed,
        **FAST,
    ).fit(reference)
    rows = []
    for name in runner.kept_strategies_:
        sets = runner.conformal_calibration(name).prediction_sets(
            runner.predict(query, strategy=name)["probabilities"], ERROR_RATE
        )
        size = sets.sum(axis=1)
        rows.append(
            {
                "part": "unseen",
                "seed": seed,
                "strategy": name,
                "unseen cells": int(is_unseen.sum()),
                "unknown share": float((size != 1).mean()),
                "empty-set share": float((size == 0).mean()),
            }
        )
    return rows


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def summary(rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    lines = []
    for part, group in frame.groupby("part", sort=False):
        lines.append(f"\n{part}:")
        numeric = [
            c
            for c in group.columns
            if c not in {"part", "seed", "strategy", "per-class coverage"}
            and pd.api.types.is_numeric_dtype(group[c])
            and group[c].notna().any()
        ]
        table = []
        for strategy, by in group.groupby("strategy", sort=False):
            row = {"strategy": strategy, "seeds": len(by)}
            for column in numeric:
                row[column] = _mean_sd(list(by[column].astype(float)))
            if "per-class coverage" in by and by["per-class coverage"].notna().all():
                per_class = pd.DataFrame(list(by["per-class coverage"])).mean()
                if len(per_class):
                    row["per-class coverage (min, max of seed means)"] = (
                        f"{per_class.min():.3f}, {per_class.max():.3f} ({len(per_class)} classes)"
                    )
            table.append(row)
        lines.append(pd.DataFrame(table).to_string(index=False))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", default=["baseline", "head", "lora"])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("cells", "donors", "unseen"),
        default=["cells", "donors", "unseen"],
    )
    parser.add_argument("--n-cells", type=int, default=3000)
    parser.add_argument("--n-markers", type=int, default=2)
    parser.add_argument("--marker-mean", type=float, default=0.5)
    parser.add_argument("--donor-shift", type=float, default=0.3)
    parser.add_argument(
        "--donors",
        type=int,
        default=3,
        help="donors: the first trains, the last is tested, the others calibrate",
    )
    args = parser.parse_args(argv)
    parts = {"cells": cells_part, "donors": donors_part, "unseen": unseen_part}
    rows: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for part in args.parts:
            for seed in args.seeds:
                rows += parts[part](seed, args)
                print(f"done: {part} seed {seed}", flush=True)
    text = "\n".join(
        [
            f"machine: {machine()}; fp32",
            f"error rate {ERROR_RATE} (target coverage {1 - ERROR_RATE:.2f}); "
            f"{args.n_cells} planted cells, {args.n_markers} markers at lognormal"
            f"({args.marker_mean}, 0.3)",
            summary(rows),
        ]
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
