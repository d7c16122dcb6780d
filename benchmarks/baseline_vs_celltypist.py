"""scdlkit's ``baseline`` strategy against CellTypist-style logistic regression, noise genes added.

``pbmc68k_reduced`` (700 cells; ``.raw``: 765 log-normalised genes; labels ``bulk_labels``) gets
``--noise-genes`` sparse uninformative genes: each is expressed in a random 0.2-3% of cells with
log1p-like values, independent of cell type. Full-transcriptome data looks like this: most genes
are rare and say nothing about the label. For each seed the cells are split as the annotation
runner splits them (stratified by label, 70/15/15, :func:`scdlkit._shared.splits.stratified_split`
with the runner's generator), and on that split:

- ``baseline``: :class:`scdlkit.baselines.ExpressionLogisticBaseline` with its defaults (what the
  ``baseline`` strategy fits);
- ``celltypist-style``: written out here, dense: genes centred and scaled on the training cells
  (``StandardScaler``), values above 10 set to 10 (as ``celltypist.train``), and a multinomial
  ``LogisticRegression`` with CellTypist's defaults (``C=1.0``, ``max_iter=1000``, lbfgs).

Printed: test macro-F1 of both (the baseline should be within 0.02 of CellTypist-style or above),
and test accuracy of a 15-nearest-neighbour classifier (fitted on the training cells) on the
baseline's latent and on an exact 50-component PCA of the CellTypist-style scaled matrix.

Run: ``python benchmarks/baseline_vs_celltypist.py [--seeds 0 1 2] [--noise-genes 10000]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible"


def noisy_pbmc(n_noise: int, seed: int = 0) -> tuple[sparse.csr_matrix, pd.Index, np.ndarray]:
    """pbmc68k_reduced's log-normalised ``.raw`` plus ``n_noise`` sparse label-free genes."""
    import scanpy as sc

    data = sc.datasets.pbmc68k_reduced()
    base = sparse.csr_matrix(data.raw.X, dtype=np.float32)
    labels = pd.Categorical(data.obs["bulk_labels"])
    rng = np.random.default_rng(seed)
    n_cells = base.shape[0]
    fraction = rng.uniform(0.002, 0.03, size=n_noise)
    counts = np.maximum(rng.binomial(n_cells, fraction), 1)
    rows = np.concatenate([rng.choice(n_cells, size=k, replace=False) for k in counts])
    cols = np.repeat(np.arange(n_noise), counts)
    values = np.log1p(rng.gamma(shape=1.5, scale=2.0, size=len(rows))).astype(np.float32)
    noise = sparse.csr_matrix((values, (rows, cols)), shape=(n_cells, n_noise))
    genes = pd.Index(list(data.raw.var_names) + [f"NOISE{i:05d}" for i in range(n_noise)])
    return sparse.hstack([base, noise], format="csr"), genes, labels.codes.astype(np.int64)


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


def knn_accuracy(latent: np.ndarray, labels: np.ndarray, parts: dict[str, np.ndarray]) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=15).fit(latent[parts["train"]], labels[parts["train"]])
    return float(np.mean(knn.predict(latent[parts["test"]]) == labels[parts["test"]]))


def one_seed(matrix, genes, labels, seed: int) -> dict[str, float]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from scdlkit.baselines import ExpressionLogisticBaseline

    parts = runner_split(labels, seed)
    train, test = parts["train"], parts["test"]
    y_test = labels[test]

    model = ExpressionLogisticBaseline(random_state=seed).fit(matrix[train], genes, labels[train])
    pred = model.classifier_.classes_[model.predict_proba(matrix[test], genes).argmax(axis=1)]
    latent = model.latent(matrix, genes)

    scaler = StandardScaler().fit(matrix[train].toarray())
    scaled = scaler.transform(matrix.toarray())
    scaled[scaled > 10] = 10
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(scaled[train], labels[train])
    pca = PCA(n_components=50, svd_solver="full").fit(scaled[train])
    return {
        "baseline_f1": f1_score(y_test, pred, average="macro"),
        "celltypist_f1": f1_score(y_test, reference.predict(scaled[test]), average="macro"),
        "baseline_knn": knn_accuracy(latent, labels, parts),
        "pca_knn": knn_accuracy(pca.transform(scaled), labels, parts),
    }


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-genes", type=int, default=10_000)
    args = parser.parse_args()

    matrix, genes, labels = noisy_pbmc(args.noise_genes)
    print(f"machine: {machine()}")
    print(
        f"data: pbmc68k_reduced, {matrix.shape[0]} cells x {matrix.shape[1]} genes "
        f"({args.noise_genes} noise genes), {len(np.unique(labels))} bulk_labels"
    )
    rows = []
    for seed in args.seeds:
        result = one_seed(matrix, genes, labels, seed)
        rows.append(result)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    print()

    def column(key: str) -> str:
        return mean_sd([r[key] for r in rows])

    print("| metric (test cells) | scdlkit baseline | reference |")
    print("|---|---|---|")
    print(
        f"| macro-F1 (reference: CellTypist-style LR) | {column('baseline_f1')} "
        f"| {column('celltypist_f1')} |"
    )
    print(
        f"| 15-NN accuracy (reference: 50-comp. PCA) | {column('baseline_knn')} "
        f"| {column('pca_knn')} |"
    )
    gap = [r["celltypist_f1"] - r["baseline_f1"] for r in rows]
    print(
        f"\nCellTypist-style minus baseline, macro-F1: {mean_sd(gap)} (per seed: "
        + ", ".join(f"{g:+.3f}" for g in gap)
        + ")"
    )


if __name__ == "__main__":
    main()
