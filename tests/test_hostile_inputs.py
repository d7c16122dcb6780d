"""Hostile queries and labels: every runner checks a query as the scGPT runners do, before any
work (values, shared genes); cells with no expressed gene are flagged, not labelled from the
prior; label strings that spell "missing" are unlabelled, never a class."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal
from scipy import sparse

import scdlkit as sck
from scdlkit._shared.labels import encode_labels


@pytest.fixture(scope="module")
def reference(_pbmc_raw):
    return _pbmc_raw[:300].copy()


@pytest.fixture(scope="module", params=["baseline", "frozen_probe"])
def fitted(request, reference, checkpoint_dir):
    runner = sck.AnnotationRunner(
        checkpoint=checkpoint_dir,
        label_key="bulk_labels",
        strategies=(request.param,),
        progress=False,
    )
    return runner.fit(reference.copy())


@pytest.fixture
def query(_pbmc_raw):
    return _pbmc_raw[300:360].copy()


def _dense(adata):
    return adata.X.toarray() if sparse.issparse(adata.X) else np.array(adata.X)


def _refused(call, adata, match):
    before = adata.copy()
    with pytest.raises(ValueError, match=match):
        call(adata)
    assert_equal(adata, before)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_query_with_non_finite_values_is_refused(fitted, query, bad):
    values = _dense(query)
    values[3, 5] = bad
    query.X = values
    _refused(fitted.predict, query, "NaN or infinite")
    _refused(lambda a: sck.tl.annotate(a, fitted), query, "NaN or infinite")


def test_a_scaled_query_is_refused_with_a_pointer_to_raw(fitted, query):
    scaled = query.copy()
    scaled.raw = query
    values = _dense(query)
    scaled.X = (values - values.mean(axis=0)) / (values.std(axis=0) + 1)
    _refused(fitted.predict, scaled, r"negative values.*\.raw")
    _refused(lambda a: sck.tl.annotate(a, fitted), scaled, r"negative values.*\.raw")


def test_a_query_sharing_no_gene_is_refused(fitted, query):
    query.var_names = [f"gene{i}" for i in range(query.n_vars)]
    _refused(fitted.predict, query, "only 0 of 765 genes")
    _refused(lambda a: sck.tl.annotate(a, fitted), query, "only 0 of 765 genes")


def test_a_query_sharing_a_handful_of_genes_is_refused(fitted, query):
    names = [f"gene{i}" for i in range(query.n_vars)]
    names[:10] = query.var_names[:10]
    query.var_names = names
    _refused(fitted.predict, query, "only 10 of 765 genes")


def test_cells_with_no_expressed_gene_are_unknown_with_a_warning(fitted, query):
    values = _dense(query)
    values[[0, 7]] = 0
    query.X = sparse.csr_matrix(values)
    with pytest.warns(UserWarning, match="2 of 60 cells have no expressed gene"):
        predictions = fitted.predict(query)
    n_classes = len(fitted.label_categories_)
    assert list(predictions["labels"][[0, 7]]) == ["Unknown", "Unknown"]
    assert (predictions["label_codes"][[0, 7]] == -1).all()
    np.testing.assert_allclose(predictions["probabilities"][[0, 7]], 1 / n_classes)
    assert predictions["no_expression"].sum() == 2
    others = np.setdiff1d(np.arange(query.n_obs), [0, 7])
    assert (predictions["label_codes"][others] >= 0).all()
    with pytest.warns(UserWarning, match="no expressed gene"):
        sck.tl.annotate(query, fitted)
    assert list(query.obs["scgpt_annotation"].iloc[[0, 7]]) == ["Unknown", "Unknown"]
    assert (query.obs["scgpt_annotation_confidence"].iloc[[0, 7]] < 0.5).all()


def test_a_clean_query_gives_no_warning(fitted, query):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        predictions = fitted.predict(query)
    assert not predictions["no_expression"].any()


@pytest.mark.parametrize("spelled", ["nan", "None", "NaN", "<NA>", " null "])
def test_label_strings_spelling_missing_are_unlabelled(spelled):
    values = pd.Series(["B", "T", spelled, "T", spelled, "B"])
    with pytest.warns(UserWarning, match="spells a missing value"):
        encoded = encode_labels(values)
    assert encoded.categories == ["B", "T"]
    assert list(encoded.codes) == [0, 1, -1, 1, -1, 0]


def test_labels_from_astype_str_train_no_class_called_nan(_pbmc_raw, checkpoint_dir):
    adata = _pbmc_raw[:200].copy()
    labels = adata.obs["bulk_labels"].astype(object)
    labels.iloc[::10] = np.nan
    adata.obs["bulk_labels"] = labels.astype(str)  # NaN becomes the string "nan"
    assert (adata.obs["bulk_labels"] == "nan").sum() == 20
    with pytest.warns(UserWarning, match="20 cells have a label that spells a missing value"):
        sck.tl.adapt_annotation(
            adata,
            "bulk_labels",
            strategies=("baseline",),
            checkpoint=checkpoint_dir,
            progress=False,
        )
    uns = adata.uns["scgpt_annotation"]
    assert "nan" not in list(uns["label_categories"])
    split = adata.obs["scgpt_annotation_split"]
    assert (split[adata.obs["bulk_labels"] == "nan"] == "unlabelled").all()


def test_a_scaled_query_is_refused_without_a_normalisation_warning_first(fitted, query):
    scaled = query.copy()
    values = _dense(query)
    scaled.X = values - values.mean(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _refused(lambda a: sck.tl.annotate(a, fitted), scaled, "negative values")
