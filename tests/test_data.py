from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal

import scdlkit as sck
from scdlkit.foundation import prepare_scgpt_data, split_scgpt_data

PBMC_COUNTS = {
    "CD4+/CD25 T Reg": 68,
    "CD4+/CD45RA+/CD25- Naive T": 8,
    "CD4+/CD45RO+ Memory": 19,
    "CD8+ Cytotoxic T": 54,
    "CD8+/CD45RA+ Naive Cytotoxic": 43,
    "CD14+ Monocyte": 129,
    "CD19+ B": 95,
    "CD34+": 13,
    "CD56+ NK": 31,
    "Dendritic": 240,
}


def test_report_on_pbmc(pbmc_raw, checkpoint_dir):
    report = sck.inspect_annotation_data(
        pbmc_raw, label_key="bulk_labels", checkpoint=checkpoint_dir
    )
    assert report.ok
    assert report.n_cells == 700
    assert report.n_genes_input == 765
    assert report.n_genes_matched == 705
    assert report.n_genes_unmatched == 60
    assert len(report.unmatched_genes_sample) == 20
    assert dict(zip(report.label_categories, report.label_counts, strict=True)) == PBMC_COUNTS
    assert report.n_classes == 10
    assert report.value_kind == "log_normalised"
    assert report.stratified_split_possible
    assert report.n_unlabelled == 0
    assert 0 < report.expressed_genes_median <= report.expressed_genes_max < report.max_seq_len
    text = repr(report)
    assert "705 of 765" in text
    assert "Dendritic (240)" in text


def test_report_flags_scaled_x(checkpoint_dir):
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    report = sck.inspect_annotation_data(pbmc, label_key="bulk_labels", checkpoint=checkpoint_dir)
    assert not report.ok
    assert report.value_kind == "scaled_negative"
    assert any("adata.raw.to_adata()" in p for p in report.problems)


def test_report_detects_raw_counts(fixture_adata, checkpoint_dir):
    fixture_adata.X = np.round(fixture_adata.X * 10)
    report = sck.inspect_annotation_data(fixture_adata, label_key=None, checkpoint=checkpoint_dir)
    assert report.value_kind == "raw_counts"
    assert report.label_key == ""


def test_inspect_never_reads_weights(pbmc_raw, checkpoint_copy):
    (checkpoint_copy / "best_model.pt").write_bytes(b"not a torch file")
    sck.tl.inspect(pbmc_raw, "bulk_labels", checkpoint=checkpoint_copy)
    assert pbmc_raw.uns["scgpt_inspect"]["n_genes_matched"] == 705


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_tl_inspect_round_trip(pbmc_raw, checkpoint_dir, tmp_path, fmt):
    pbmc_raw.obs.loc[pbmc_raw.obs_names[:5], "bulk_labels"] = np.nan
    sck.tl.inspect(pbmc_raw, "bulk_labels", checkpoint=checkpoint_dir)
    stored = pbmc_raw.uns["scgpt_inspect"]
    assert stored["n_unlabelled"] == 5
    assert stored["ok"]
    path = tmp_path / f"a.{fmt}"
    getattr(pbmc_raw, f"write_{fmt}")(path)
    back = ad.read_h5ad(path) if fmt == "h5ad" else ad.read_zarr(path)
    assert_equal(back.uns["scgpt_inspect"], pbmc_raw.uns["scgpt_inspect"])


def test_tl_inspect_copy(pbmc_raw, checkpoint_dir):
    out = sck.tl.inspect(pbmc_raw, "bulk_labels", checkpoint=checkpoint_dir, copy=True)
    assert "scgpt_inspect" in out.uns
    assert "scgpt_inspect" not in pbmc_raw.uns


def _ensembl(adata: ad.AnnData) -> ad.AnnData:
    adata.var["symbol"] = adata.var_names.astype(str)
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    return adata


def test_ensembl_ids_with_symbol_column(pbmc_raw, checkpoint_dir):
    adata = _ensembl(pbmc_raw)
    report = sck.inspect_annotation_data(adata, label_key="bulk_labels", checkpoint=checkpoint_dir)
    assert not report.ok
    assert any("gene_key" in p for p in report.problems)
    with pytest.raises(ValueError, match="gene_key"):
        prepare_scgpt_data(adata, checkpoint=checkpoint_dir, label_key="bulk_labels")
    report = sck.inspect_annotation_data(
        adata, label_key="bulk_labels", checkpoint=checkpoint_dir, gene_key="symbol"
    )
    assert report.ok
    assert report.n_genes_matched == 705
    prepared = prepare_scgpt_data(
        adata, checkpoint=checkpoint_dir, label_key="bulk_labels", gene_key="symbol"
    )
    assert len(prepared.matched_genes) == 705


def test_prepare(pbmc_raw, checkpoint_dir):
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    assert prepared.n_cells == 700
    assert prepared.label_categories == list(pbmc_raw.obs["bulk_labels"].cat.categories)
    counts = np.bincount(prepared.label_codes, minlength=10)
    assert dict(zip(prepared.label_categories, counts.tolist(), strict=True)) == PBMC_COUNTS
    assert len(prepared.matched_genes) == 705
    assert prepared.tokens.nbytes < 8 * len(prepared.tokens.gene_ids) + 8 * 701
    batch = prepared.dataset().collate_fn([0, 1, 2])
    assert batch["gene_ids"].shape[0] == 3
    assert (batch["gene_ids"][:, 0] == prepared.checkpoint.cls_id).all()
    assert batch["labels"].tolist() == prepared.label_codes[:3].tolist()


@pytest.mark.parametrize("missing", [np.nan, None, "", "  "])
def test_missing_labels_are_unlabelled(pbmc_raw, checkpoint_dir, missing):
    labels = pbmc_raw.obs["bulk_labels"].astype(object)
    labels.iloc[:10] = missing
    pbmc_raw.obs["bulk_labels"] = labels
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    assert (prepared.label_codes[:10] == -1).all()
    assert (prepared.label_codes[10:] >= 0).all()
    assert "nan" not in prepared.label_categories
    assert "" not in prepared.label_categories
    splits = split_scgpt_data(prepared)
    used = np.concatenate([splits.train_indices, splits.val_indices, splits.test_indices])
    assert not set(used) & set(range(10))
    assert (splits.split_labels()[:10] == "unlabelled").all()


def test_split_is_stratified_and_reproducible(pbmc_raw, checkpoint_dir):
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    a = split_scgpt_data(prepared, random_state=0)
    b = split_scgpt_data(prepared, random_state=0)
    c = split_scgpt_data(prepared, random_state=1)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.indices(name), b.indices(name))
    assert not np.array_equal(a.test_indices, c.test_indices)
    all_idx = np.concatenate([a.train_indices, a.val_indices, a.test_indices])
    assert sorted(all_idx.tolist()) == list(range(700))
    assert abs(len(a.test_indices) - 105) <= 10
    for name in ("train", "val", "test"):
        present = set(prepared.label_codes[a.indices(name)].tolist())
        assert present == set(range(10)), name
    assert a.tokens_shared if hasattr(a, "tokens_shared") else a.train.tokens is prepared.tokens


def test_small_class_fallback(pbmc_raw, checkpoint_dir):
    labels = pbmc_raw.obs["bulk_labels"].astype(str)
    labels.iloc[:2] = "rare"
    pbmc_raw.obs["bulk_labels"] = pd.Categorical(labels)
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    with pytest.warns(UserWarning, match="rare"):
        splits = split_scgpt_data(prepared)
    assert splits.small_classes == ["rare"]
    assert {0, 1} <= set(splits.train_indices.tolist())
    report = sck.inspect_annotation_data(
        pbmc_raw, label_key="bulk_labels", checkpoint=checkpoint_dir
    )
    assert not report.stratified_split_possible
    assert any("rare" in w for w in report.warnings)


def test_unstratified_split(pbmc_raw, checkpoint_dir):
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    splits = split_scgpt_data(prepared, stratify=False, val_size=0.1, test_size=0.2)
    assert len(splits.test_indices) == 140
    assert len(splits.val_indices) == 70


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_size": 0.6, "test_size": 0.5}, ValueError, "no cells for training"),
        ({"val_size": -0.1}, ValueError, "val_size"),
        ({"test_size": 1.5}, ValueError, "test_size"),
    ],
)
def test_split_argument_errors(pbmc_raw, checkpoint_dir, kwargs, error, match):
    prepared = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    with pytest.raises(error, match=match):
        split_scgpt_data(prepared, **kwargs)


def _one_class(adata):
    adata.obs["bulk_labels"] = "T cell"


def _scaled(adata):
    adata.X.data[::7] *= -1


def _nan(adata):
    adata.X.data[3] = np.inf


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (None, {"label_key": "cell_type"}, KeyError, "label_key='cell_type'"),
        (None, {"label_key": "bulk_labels", "gene_key": "sym"}, KeyError, "gene_key='sym'"),
        (None, {"label_key": "bulk_labels", "layer": "counts"}, KeyError, "layer='counts'"),
        (_one_class, {"label_key": "bulk_labels"}, ValueError, "at least 2"),
        (_scaled, {"label_key": "bulk_labels"}, ValueError, "negative"),
        (_nan, {"label_key": "bulk_labels"}, ValueError, "NaN or infinite"),
        (None, {"label_key": "bulk_labels", "min_gene_overlap": 800}, ValueError, "only 705"),
    ],
)
def test_prepare_error_battery(pbmc_raw, checkpoint_dir, mutate, kwargs, error, match):
    if mutate is not None:
        mutate(pbmc_raw)
    before = pbmc_raw.copy()
    with pytest.raises(error, match=match):
        prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, **kwargs)
    assert_equal(pbmc_raw, before)


def test_inspect_argument_errors_leave_adata_unchanged(pbmc_raw, checkpoint_dir):
    before = pbmc_raw.copy()
    with pytest.raises(KeyError, match="label_key"):
        sck.tl.inspect(pbmc_raw, "cell_type", checkpoint=checkpoint_dir)
    with pytest.raises(FileNotFoundError):
        sck.tl.inspect(pbmc_raw, "bulk_labels", checkpoint="no-such-checkpoint")
    assert_equal(pbmc_raw, before)


@pytest.mark.parametrize("storage", ["backed", "dask"])
def test_prepare_out_of_core_gives_the_same_tokens(pbmc_raw, checkpoint_dir, tmp_path, storage):
    from scipy import sparse

    pbmc_raw.X = sparse.csr_matrix(pbmc_raw.X)
    expected = prepare_scgpt_data(pbmc_raw, checkpoint=checkpoint_dir, label_key="bulk_labels")
    if storage == "backed":
        pbmc_raw.write_h5ad(tmp_path / "cells.h5ad")
        adata = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    else:
        da = pytest.importorskip("dask.array")
        adata = pbmc_raw.copy()
        adata.X = da.from_array(pbmc_raw.X.toarray(), chunks=(128, 765))
    got = prepare_scgpt_data(adata, checkpoint=checkpoint_dir, label_key="bulk_labels")
    for field in ("indptr", "gene_ids", "bins"):
        np.testing.assert_array_equal(getattr(got.tokens, field), getattr(expected.tokens, field))
    np.testing.assert_array_equal(got.label_codes, expected.label_codes)
    assert got.matched_genes == expected.matched_genes
    if storage == "backed":
        assert adata.isbacked  # read in chunks, not loaded
        adata.file.close()
