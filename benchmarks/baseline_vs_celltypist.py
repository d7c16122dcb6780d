"""scdlkit's ``baseline`` strategy against CellTypist itself, on the same reference and query cells.

``pbmc68k_reduced`` (700 cells; ``.raw``: 765 genes, log1p of counts normalised to 10,000;
labels ``bulk_labels``) gets ``--noise-genes`` sparse uninformative genes: each is expressed in a
random 0.2-3% of cells with log1p-like values, independent of cell type. Full-transcriptome data
looks like this: most genes are rare and say nothing about the label. For each seed the cells are
split as the annotation runner splits them (stratified by label, 70/15/15,
:func:`scdlkit._shared.splits.stratified_split` with the runner's generator); the 70% are the
reference and the 15% test cells the query of both methods:

- ``baseline``: :class:`scdlkit.baselines.ExpressionLogisticBaseline` with its defaults (what the
  ``baseline`` strategy fits): genes standardised on the reference and clipped at +-10, then one
  multinomial (softmax) logistic regression, ``C=1``.
- ``CellTypist``: ``celltypist.train`` on the reference AnnData with its defaults (its own
  ``StandardScaler`` and clipping above 10, then scikit-learn's one-vs-rest
  ``LogisticRegression(C=1, solver="lbfgs", max_iter=1000)``; ``use_SGD=False``), then
  ``celltypist.annotate`` on the query: ``mode="best match"`` for the labels, and
  ``mode="prob match"`` (``p_thres=0.5``) for the share of cells it leaves ``Unassigned``.
  ``check_expression=False``: the values are log1p of counts normalised to 10,000, but ``.raw``
  keeps 765 genes of the transcriptome, so no cell sums to 10,000 after ``expm1`` as CellTypist's
  check wants (the script checks instead that every cell sums to at most 10,000).

CellTypist is optional (``pip install celltypist``; it is not a dependency of scdlkit). Without it,
or where it cannot train (CellTypist 1.7.1 passes ``multi_class="ovr"``, which scikit-learn 1.8
removed: run it with scikit-learn < 1.8), the script says so and compares with a multinomial
rewrite of CellTypist's scaling instead, which is not CellTypist.

Printed: the machine, then per seed the test macro-F1 and accuracy of both, the share of query
cells on which their labels agree, and the mean +- sd over seeds.

Run: ``python benchmarks/baseline_vs_celltypist.py [--seeds 0 1 2] [--noise-genes 10000]
[--celltypist auto|require|off]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
from scipy import sparse

COLUMNS = (
    "seed",
    "query cells",
    "baseline macro-F1",
    "other macro-F1",
    "baseline accuracy",
    "other accuracy",
    "label agreement %",
    "prob match Unassigned %",
    "baseline Unknown at 0.5 %",
    "threshold for that share",
)
#: Where the comparison is not CellTypist itself, say what it is instead.
REWRITE = "multinomial rewrite of CellTypist's scaling (NOT CellTypist)"
#: Column names say which method "other" is.
NAMES = {True: "CellTypist", False: "rewrite"}


# --------------------------------------------------------------------------------- machine


def machine() -> str:
    """CPU model, its native bf16 flags (``avx512_bf16``, ``amx_bf16``) and cores."""
    models: list[str] = []
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                models.append(value.strip())
            elif key.strip() == "flags":
                flags |= set(value.split()) & {"avx512_bf16", "amx_bf16"}
    except OSError:
        pass
    cpu = models[0] if models else platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = " ".join(sorted(flags)) or "none"
    return f"{cpu}; bf16 flags: {bf16}; {os.cpu_count()} cores visible, {usable} usable"


# ------------------------------------------------------------------------------------ data


def noisy_pbmc(n_noise: int, seed: int = 0) -> tuple[sparse.csr_matrix, pd.Index, pd.Categorical]:
    """pbmc68k_reduced's log-normalised ``.raw`` plus ``n_noise`` sparse label-free genes."""
    import scanpy as sc

    data = sc.datasets.pbmc68k_reduced()
    base = sparse.csr_matrix(data.raw.X, dtype=np.float32)
    labels = pd.Categorical(data.obs["bulk_labels"])
    rng = np.random.default_rng(seed)
    n_cells = base.shape[0]
    fraction = rng.uniform(0.002, 0.03, size=n_noise)
    counts = np.maximum(rng.binomial(n_cells, fraction), 1)
    rows = np.concatenate([rng.choice(n_cells, size=k, replace=False) for k in counts] or [[]])
    cols = np.repeat(np.arange(n_noise), counts)
    values = np.log1p(rng.gamma(shape=1.5, scale=2.0, size=len(rows))).astype(np.float32)
    noise = sparse.csr_matrix((values, (rows.astype(np.int64), cols)), shape=(n_cells, n_noise))
    genes = pd.Index(list(data.raw.var_names) + [f"NOISE{i:05d}" for i in range(n_noise)])
    return sparse.hstack([base, noise], format="csr"), genes, labels


def check_log_normalised(matrix: sparse.csr_matrix, n_noise: int) -> str:
    """Why ``check_expression=False`` is right here; raises if the data are not log1p per 1e4."""
    totals = np.asarray(np.expm1(matrix[:, : matrix.shape[1] - n_noise]).sum(axis=1)).ravel()
    if totals.max() > 10_000 + 1:
        msg = f"a cell sums to {totals.max():.0f} after expm1; expected log1p of counts per 10,000."
        raise ValueError(msg)
    return (
        f"expm1 of the real genes sums to {totals.min():.0f}-{totals.max():.0f} per cell "
        "(log1p per 10,000 over the whole transcriptome, 765 genes kept): "
        "celltypist.train(check_expression=False)"
    )


def runner_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The annotation runner's stratified split (``split_scgpt_data`` defaults) of all cells."""
    from scdlkit._shared.splits import stratified_split

    parts, _ = stratified_split(
        np.arange(len(labels)),
        labels,
        val_size=0.15,
        test_size=0.15,
        random_state=np.random.default_rng(seed),
    )
    return parts


# ------------------------------------------------------------------------------ the methods


def baseline_labels(matrix, genes, codes, parts, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Query label codes and top probabilities from scdlkit's ``baseline`` (its defaults)
    fitted on the reference."""
    from scdlkit.baselines import ExpressionLogisticBaseline

    train, test = parts["train"], parts["test"]
    model = ExpressionLogisticBaseline(random_state=seed).fit(matrix[train], genes, codes[train])
    proba = model.predict_proba(matrix[test], genes)
    return model.classifier_.classes_[proba.argmax(axis=1)], proba.max(axis=1)


def rewrite_labels(matrix, codes, parts) -> np.ndarray:
    """Query label codes from a multinomial logistic regression on CellTypist-style scaling."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = parts["train"], parts["test"]
    scaler = StandardScaler().fit(matrix[train].toarray())
    reference, query = (
        np.minimum(scaler.transform(matrix[p].toarray()), 10) for p in (train, test)
    )
    model = LogisticRegression(C=1.0, max_iter=1000).fit(reference, codes[train])
    return model.predict(query)


def _anndata(matrix, genes, names=None):
    import anndata as ad

    adata = ad.AnnData(sparse.csr_matrix(matrix, dtype=np.float32))
    adata.var_names = genes
    if names is not None:
        adata.obs["label"] = pd.Categorical(np.asarray(names))
    return adata


def celltypist_labels(celltypist, matrix, genes, labels, parts) -> tuple[np.ndarray, np.ndarray]:
    """``celltypist.train`` on the reference, ``celltypist.annotate`` on the query.

    Returns the "best match" label names and the "prob match" (``p_thres=0.5``) label strings.
    """
    train, test = parts["train"], parts["test"]
    reference = _anndata(matrix[train], genes, np.asarray(labels)[train])
    model = celltypist.train(reference, labels="label", check_expression=False, use_SGD=False)
    query = _anndata(matrix[test], genes)
    best = celltypist.annotate(query, model=model, mode="best match")
    prob = celltypist.annotate(query, model=model, mode="prob match", p_thres=0.5)
    return (
        best.predicted_labels["predicted_labels"].astype(str).to_numpy(),
        prob.predicted_labels["predicted_labels"].astype(str).to_numpy(),
    )


def load_celltypist(mode: str) -> tuple[ModuleType | None, str]:
    """CellTypist, if installed and able to train here, and a line saying what is compared."""
    if mode == "off":
        return None, f"compared with: {REWRITE} (--celltypist off)"
    root_level = logging.getLogger().level
    try:
        import celltypist
    except ImportError:
        reason = "celltypist is not installed (pip install celltypist)"
    else:
        logging.getLogger().setLevel(root_level)  # celltypist's import sets the root to INFO
        celltypist.logger.set_level(logging.ERROR)
        reason = _training_problem(celltypist)
        if reason is None:
            import sklearn

            return celltypist, (
                f"compared with: CellTypist {celltypist.__version__} itself "
                f"(scikit-learn {sklearn.__version__}): one-vs-rest logistic regression"
            )
    if mode == "require":
        raise SystemExit(f"--celltypist require: {reason}")
    return None, f"compared with: {REWRITE}, because {reason}"


def _training_problem(celltypist) -> str | None:
    """Why ``celltypist.train`` fails on a toy problem here, or ``None`` if it works."""
    rng = np.random.default_rng(0)
    toy = rng.random((12, 4)).astype(np.float32)
    try:
        celltypist.train(
            toy, labels=np.repeat(["a", "b", "c"], 4), genes=["g1", "g2", "g3", "g4"],
            check_expression=False, use_SGD=False,
        )  # fmt: skip
    except TypeError as error:
        import sklearn

        return (
            f"celltypist {celltypist.__version__} cannot train with scikit-learn "
            f"{sklearn.__version__} ({error}); run with scikit-learn < 1.8"
        )
    return None


# ------------------------------------------------------------------------------- one seed


def one_seed(matrix, genes, labels: pd.Categorical, seed: int, celltypist) -> dict[str, float]:
    """Test macro-F1 and accuracy of both methods on one split, and their agreement."""
    from sklearn.metrics import accuracy_score, f1_score

    codes = labels.codes.astype(np.int64)
    parts = runner_split(codes, seed)
    y_test = codes[parts["test"]]
    ours, top = baseline_labels(matrix, genes, codes, parts, seed)
    unassigned = math.nan
    if celltypist is None:
        theirs = rewrite_labels(matrix, codes, parts)
    else:
        best, prob = celltypist_labels(celltypist, matrix, genes, labels, parts)
        theirs = pd.Categorical(best, categories=labels.categories).codes.astype(np.int64)
        unassigned = 100 * float(np.mean(prob == "Unassigned"))

    def f1(pred: np.ndarray) -> float:
        return float(f1_score(y_test, pred, average="macro", zero_division=0))

    return {
        "query cells": len(y_test),
        "baseline macro-F1": f1(ours),
        "other macro-F1": f1(theirs),
        "baseline accuracy": float(accuracy_score(y_test, ours)),
        "other accuracy": float(accuracy_score(y_test, theirs)),
        "label agreement %": 100 * float(np.mean(ours == theirs)),
        "prob match Unassigned %": unassigned,
        "baseline Unknown at 0.5 %": 100 * float(np.mean(top < 0.5)),
        # the confidence_threshold that leaves as many cells unknown as prob match does
        "threshold for that share": float(np.quantile(top, unassigned / 100))
        if np.isfinite(unassigned)
        else math.nan,
    }


# --------------------------------------------------------------------------------- table


def _cell(key: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if key.endswith("%") else f"{value:.3f}"


def mean_sd(key: str, values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{_cell(key, statistics.mean(values))} ± {_cell(key, sd)}"


def table(seeds: list[int], rows: list[dict[str, float]], *, other: str) -> str:
    """Markdown table: one row per seed, then mean ± sd; ``other`` names the compared method."""
    header = [column.replace("other", other) for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, row in zip(seeds, rows, strict=True):
        cells = [str(seed), str(row["query cells"])]
        cells += [_cell(key, row[key]) for key in COLUMNS[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    n_query = sorted({row["query cells"] for row in rows})
    span = str(n_query[0]) if len(n_query) == 1 else f"{n_query[0]}-{n_query[-1]}"
    cells = ["mean ± sd", span]
    cells += [mean_sd(key, [row[key] for row in rows]) for key in COLUMNS[2:]]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-genes", type=int, default=10_000)
    parser.add_argument(
        "--celltypist",
        choices=("auto", "require", "off"),
        default="auto",
        help="auto: CellTypist where it is installed and can train, else the rewrite",
    )
    args = parser.parse_args(argv)

    celltypist, compared = load_celltypist(args.celltypist)
    other = NAMES[celltypist is not None]
    matrix, genes, labels = noisy_pbmc(args.noise_genes)
    out = [
        f"machine: {machine()}",
        f"data: pbmc68k_reduced, {matrix.shape[0]} cells x {matrix.shape[1]} genes "
        f"({args.noise_genes} noise genes), {len(labels.categories)} bulk_labels; "
        "reference = the runner's 70% train cells, query = its 15% test cells",
        "baseline: scdlkit ExpressionLogisticBaseline, multinomial (softmax), C=1",
        compared,
    ]
    if celltypist is not None:
        out.append(check_log_normalised(matrix, args.noise_genes))
    rows = [one_seed(matrix, genes, labels, seed, celltypist) for seed in args.seeds]
    out += ["", table(args.seeds, rows, other=other)]
    gap = [r["other macro-F1"] - r["baseline macro-F1"] for r in rows]
    out.append(
        f"\n{other} minus baseline, macro-F1: {mean_sd('gap', gap)} (per seed: "
        + ", ".join(f"{g:+.3f}" for g in gap)
        + ")"
    )
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
