"""The expression baseline: CellTypist-style standardising, exact sparse fit, PCA latent, state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.linear_model import LogisticRegression

from scdlkit.baselines import _expression
from scdlkit.baselines._expression import (
    ExpressionLogisticBaseline,
    gene_mean_scale,
    highly_variable_genes,
)


def _data(
    n_cells: int = 120, n_genes: int = 30, n_classes: int = 3, seed: int = 0
) -> tuple[sparse.csr_matrix, pd.Index, np.ndarray]:
    """Sparse log-like expression with class markers, a gene seen in one cell, a gene missing
    from one cell, and a constant gene."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_cells) % n_classes
    dense = np.where(
        rng.random((n_cells, n_genes)) < 0.3, np.log1p(rng.gamma(2, 2, (n_cells, n_genes))), 0
    )
    for c in range(n_classes):
        dense[labels == c, c] += 2.0
    dense[:, -1] = 0.0
    dense[0, -2] = 40.0  # seen in one cell: standardised far beyond 10 unless clipped
    dense[1:, -2] = 0.0
    dense[:, -3] = 3.0
    dense[5, -3] = 0.0  # zero in one cell only: standardised far below -10 unless clipped
    genes = pd.Index([f"g{i}" for i in range(n_genes)])
    return sparse.csr_matrix(dense), genes, labels


def _dense_reference(matrix: sparse.csr_matrix, max_value: float | None = 10.0) -> np.ndarray:
    x = matrix.toarray()
    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 1e-6, std, 1.0)
    return z if max_value is None else np.clip(z, -max_value, max_value)


def test_genes_are_centred_scaled_and_clipped():
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=3).fit(matrix, genes, labels)
    z = model.standardised(matrix, genes)
    np.testing.assert_allclose(z, _dense_reference(matrix), atol=1e-12)
    assert z[0, -2] == 10.0  # rare gene clipped
    assert z[5, -3] == -10.0  # a zero below the mean: clipped too
    assert z[0, -3] == pytest.approx(1 / np.sqrt(len(labels) - 1))
    np.testing.assert_allclose(z[:, -1], 0.0)  # constant gene: centred, not scaled
    unclipped = ExpressionLogisticBaseline(n_components=3, max_value=None).fit(
        matrix, genes, labels
    )
    z_raw = unclipped.standardised(matrix, genes)
    assert z_raw[0, -2] == pytest.approx(np.sqrt(len(labels) - 1))
    np.testing.assert_allclose(z_raw.mean(axis=0), 0.0, atol=1e-12)


def test_gene_mean_scale_is_population_std_with_constant_genes_at_one():
    matrix, _, _ = _data()
    mean, scale = gene_mean_scale(matrix)
    x = matrix.toarray()
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(scale[:-1], x.std(axis=0)[:-1])
    assert scale[-1] == 1.0


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_sparse_fit_equals_sklearn_on_the_dense_standardised_matrix(n_classes, class_weight):
    matrix, genes, labels = _data(n_classes=n_classes)
    labels = np.where(np.arange(len(labels)) < 12, 0, labels)  # imbalanced
    model = ExpressionLogisticBaseline(n_components=3, class_weight=class_weight).fit(
        matrix, genes, labels
    )
    z = _dense_reference(matrix)
    reference = LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight).fit(z, labels)
    # Same objective, same L-BFGS path: the same point, not only the same optimum
    np.testing.assert_allclose(model.classifier_.coef_, reference.coef_, atol=1e-8)
    np.testing.assert_allclose(model.classifier_.intercept_, reference.intercept_, atol=1e-8)
    np.testing.assert_allclose(
        model.predict_proba(matrix, genes), reference.predict_proba(z), atol=1e-8
    )
    assert model.n_parameters == reference.coef_.size + reference.intercept_.size


def test_class_weight_changes_the_fit():
    matrix, genes, labels = _data()
    labels = np.where(np.arange(len(labels)) < 60, 0, labels)
    plain = ExpressionLogisticBaseline(n_components=3).fit(matrix, genes, labels)
    weighted = ExpressionLogisticBaseline(n_components=3, class_weight="balanced").fit(
        matrix, genes, labels
    )
    assert not np.allclose(plain.classifier_.coef_, weighted.classifier_.coef_, atol=1e-3)
    rare = labels != 0
    p_plain = plain.predict_proba(matrix, genes)[rare, 1:].sum(axis=1).mean()
    p_weighted = weighted.predict_proba(matrix, genes)[rare, 1:].sum(axis=1).mean()
    assert p_weighted > p_plain  # minority classes get more probability when weighted


@pytest.mark.parametrize("dense_limit", [10**9, 0])  # exact dense PCA and sparse ARPACK
def test_latent_is_pca_of_the_standardised_matrix(monkeypatch, dense_limit):
    monkeypatch.setattr(_expression, "DENSE_PCA_LIMIT", dense_limit)
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=4).fit(matrix, genes, labels)
    latent = model.latent(matrix, genes)
    assert latent.shape == (matrix.shape[0], 4)
    assert latent.dtype == np.float32
    z = _dense_reference(matrix)
    expected = PCA(n_components=4, svd_solver="full").fit_transform(z)
    signs = np.sign((latent * expected).sum(axis=0))
    np.testing.assert_allclose(latent * signs, expected, atol=1e-4)
    np.testing.assert_allclose(model.pca_.transform(z), latent, atol=1e-4)


def test_latent_dimensions_are_capped_by_the_training_cells():
    matrix, genes, labels = _data(n_cells=9)
    model = ExpressionLogisticBaseline().fit(matrix, genes, labels)
    assert model.latent(matrix, genes).shape == (9, 8)


def test_chunked_prediction_equals_one_block(monkeypatch):
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=3).fit(matrix, genes, labels)
    whole_proba, whole_latent = model.predict_proba(matrix, genes), model.latent(matrix, genes)
    monkeypatch.setattr(_expression, "PREDICT_CHUNK", 7)
    np.testing.assert_allclose(model.predict_proba(matrix, genes), whole_proba, atol=1e-12)
    np.testing.assert_allclose(model.latent(matrix, genes), whole_latent, atol=1e-6)


def test_query_genes_are_matched_by_name_and_missing_ones_count_as_zero():
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=3).fit(matrix, genes, labels)
    order = np.random.default_rng(1).permutation(len(genes))
    np.testing.assert_allclose(
        model.predict_proba(matrix[:, order], genes[order]),
        model.predict_proba(matrix, genes),
        atol=1e-12,
    )
    zeroed = matrix.tolil()
    zeroed[:, 4] = 0
    without = np.delete(np.arange(len(genes)), 4)
    np.testing.assert_allclose(
        model.predict_proba(matrix[:, without], genes[without]),
        model.predict_proba(sparse.csr_matrix(zeroed), genes),
        atol=1e-12,
    )


def test_state_round_trip_predicts_identically():
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=3, n_top_genes=20).fit(matrix, genes, labels)
    arrays = {k: np.array(v) for k, v in model.state_arrays().items()}
    assert {"mean", "scale", "max_value", "pca_components", "pca_mean"} <= set(arrays)
    restored = ExpressionLogisticBaseline.from_state(arrays, model.genes_)
    np.testing.assert_array_equal(
        restored.predict_proba(matrix, genes), model.predict_proba(matrix, genes)
    )
    np.testing.assert_array_equal(restored.latent(matrix, genes), model.latent(matrix, genes))
    assert restored.n_parameters == model.n_parameters
    assert restored.max_value == 10.0

    unclipped = ExpressionLogisticBaseline(n_components=3, max_value=None).fit(
        matrix, genes, labels
    )
    again = ExpressionLogisticBaseline.from_state(unclipped.state_arrays(), unclipped.genes_)
    assert again.max_value is None
    np.testing.assert_array_equal(
        again.predict_proba(matrix, genes), unclipped.predict_proba(matrix, genes)
    )


def test_a_baseline_saved_before_centring_loads_and_predicts_as_it_did():
    """Old states (scale, coef, intercept, classes, svd_components; no mean): mean 0, no clip."""
    matrix, genes, labels = _data()
    x = matrix.toarray()
    scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0).astype(np.float32)
    scaled = x / scale
    old_classifier = LogisticRegression(max_iter=1000).fit(scaled, labels)
    old_svd = TruncatedSVD(n_components=3, random_state=0).fit(scaled)
    arrays = {
        "scale": scale,
        "coef": old_classifier.coef_,
        "intercept": old_classifier.intercept_,
        "classes": old_classifier.classes_.astype(np.int64),
        "svd_components": old_svd.components_,
    }
    restored = ExpressionLogisticBaseline.from_state(arrays, list(genes))
    assert restored.max_value is None
    np.testing.assert_allclose(
        restored.predict_proba(matrix, genes), old_classifier.predict_proba(scaled), atol=1e-6
    )
    np.testing.assert_allclose(restored.latent(matrix, genes), old_svd.transform(scaled), atol=1e-4)


def test_from_state_refuses_a_gene_list_of_another_length():
    matrix, genes, labels = _data()
    model = ExpressionLogisticBaseline(n_components=3).fit(matrix, genes, labels)
    with pytest.raises(ValueError, match="different models"):
        ExpressionLogisticBaseline.from_state(model.state_arrays(), model.genes_[:-1])


def test_highly_variable_gene_selection_keeps_the_variable_genes():
    rng = np.random.default_rng(0)
    n_cells, n_genes = 200, 400
    dense = np.log1p(rng.poisson(2.0, (n_cells, n_genes)).astype(float))
    labels = np.arange(n_cells) % 2
    variable = [3, 170, 341]
    # Same mean as the others (2), three times the dispersion: high within its bin
    on = rng.poisson(4.0, (n_cells, len(variable))) * (labels[:, None] == 1)
    dense[:, variable] = np.log1p(on.astype(float))
    matrix, genes = sparse.csr_matrix(dense), pd.Index([f"g{i}" for i in range(n_genes)])
    keep = highly_variable_genes(matrix, n_top_genes=5)
    assert len(keep) == 5
    assert set(variable) <= set(keep.tolist())
    assert np.all(np.diff(keep) > 0)
    model = ExpressionLogisticBaseline(n_components=2, n_top_genes=5).fit(matrix, genes, labels)
    assert model.genes_ == [genes[i] for i in keep]
    assert model.classifier_.coef_.shape == (1, 5)
    assert (model.predict_proba(matrix, genes).argmax(axis=1) == labels).all()
    every = ExpressionLogisticBaseline(n_components=2, n_top_genes=500).fit(matrix, genes, labels)
    assert every.genes_ == list(genes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_value": 0}, "max_value"),
        ({"n_top_genes": 0}, "n_top_genes"),
        ({"class_weight": "auto"}, "class_weight"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpressionLogisticBaseline(**kwargs)


def test_one_training_class_is_refused():
    matrix, genes, labels = _data()
    with pytest.raises(ValueError, match="at least 2 classes"):
        ExpressionLogisticBaseline().fit(matrix, genes, np.zeros_like(labels))
