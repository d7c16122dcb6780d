from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal

import scdlkit as sck
from scdlkit.foundation import prepare_scgpt_data, split_scgpt_data

KEY = "scgpt_annotation"
FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False}


def _with_donors(adata: ad.AnnData) -> ad.AnnData:
    """Three pseudo-donors; donor d3 has no CD34+ cells (they all belong to d1)."""
    donors = np.array(["d1", "d2", "d3"])[np.arange(adata.n_obs) % 3].astype(object)
    donors[(adata.obs["bulk_labels"] == "CD34+").to_numpy()] = "d1"
    adata.obs["donor"] = pd.Categorical(donors)
    return adata


@pytest.fixture
def donors(pbmc_raw):
    return _with_donors(pbmc_raw)


def test_preflight_reports_batches(donors, checkpoint_dir):
    report = sck.inspect_annotation_data(
        donors, label_key="bulk_labels", checkpoint=checkpoint_dir, batch_key="donor"
    )
    assert report.batch_names == ["d1", "d2", "d3"]
    assert sum(report.batch_cell_counts) == donors.n_obs
    assert report.batch_class_counts == [10, 9, 9]
    assert report.classes_in_one_batch == ["CD34+"]
    assert any("only one batch: CD34+" in w for w in report.warnings)
    assert "d3 (" in repr(report)


def test_batch_split_holds_out_whole_batches(donors, checkpoint_dir):
    prepared = prepare_scgpt_data(
        donors, checkpoint=checkpoint_dir, label_key="bulk_labels", batch_key="donor"
    )
    a = split_scgpt_data(prepared, split_by="batch", random_state=3)
    b = split_scgpt_data(prepared, split_by="batch", random_state=3)
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    batch = prepared.batches
    assert len(a.test_batches) == 1
    assert set(batch[a.test_indices]) == set(a.test_batches)
    assert not set(batch[a.train_indices]) & set(a.test_batches)
    assert not set(batch[a.val_indices]) & set(a.test_batches)
    named = split_scgpt_data(prepared, split_by="batch", test_batches=["d2"], val_batches=["d3"])
    assert set(batch[named.test_indices]) == {"d2"}
    assert set(batch[named.val_indices]) == {"d3"}
    assert set(batch[named.train_indices]) == {"d1"}
    with pytest.raises(ValueError, match="not batches"):
        split_scgpt_data(prepared, split_by="batch", test_batches=["d9"])


def test_missing_batch_values_fail_and_leave_adata_unchanged(donors, checkpoint_dir):
    donor = donors.obs["donor"].astype(object)
    donor.iloc[3] = np.nan
    donors.obs["donor"] = donor
    before = donors.copy()
    for call in (
        lambda: sck.tl.inspect(donors, "bulk_labels", checkpoint=checkpoint_dir, batch_key="donor"),
        lambda: sck.tl.adapt_annotation(
            donors,
            "bulk_labels",
            checkpoint=checkpoint_dir,
            strategies=("baseline",),
            batch_key="donor",
            split_by="batch",
            **FAST,
        ),
    ):
        with pytest.raises(ValueError, match=r"batch_key='donor'.*no batch"):
            call()
    assert_equal(donors, before)


def test_split_by_batch_needs_batch_key(checkpoint_dir, donors):
    with pytest.raises(ValueError, match="batch_key"):
        sck.tl.adapt_annotation(
            donors, "bulk_labels", checkpoint=checkpoint_dir, split_by="batch", **FAST
        )


@pytest.fixture(scope="module")
def adapted_by_batch(_pbmc_raw, checkpoint_dir, tmp_path_factory):
    adata = _with_donors(_pbmc_raw.copy())
    out = tmp_path_factory.mktemp("batch")
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "head", "baseline"),
        batch_key="donor",
        split_by="batch",
        test_batches=["d3"],
        output_dir=out,
        **FAST,
    )
    return adata, out


def test_per_batch_metrics_written(adapted_by_batch):
    adata, out = adapted_by_batch
    split = adata.obs[f"{KEY}_split"].astype(str)
    assert set(adata.obs.loc[split == "test", "donor"]) == {"d3"}
    uns = adata.uns[KEY]
    assert uns["split"]["split_by"] == "batch"
    assert list(uns["split"]["test_batches"]) == ["d3"]
    frame = uns["batch_metrics"]
    assert set(frame["strategy"]) == {"frozen_probe", "head", "baseline"}
    assert set(frame["batch"]) == {"d3"}
    assert (frame["n_cells"] == (split == "test").sum()).all()
    assert frame[["accuracy", "macro_f1"]].notna().all().all()
    report = (out / "report.md").read_text()
    assert "## Per-batch test metrics" in report
    assert "d3" in report
    assert (out / "batch_metrics.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_batch_metrics_round_trip(adapted_by_batch, tmp_path, fmt):
    adata, _ = adapted_by_batch
    path = tmp_path / f"a.{fmt}"
    getattr(adata, f"write_{fmt}")(path)
    back = ad.read_h5ad(path) if fmt == "h5ad" else ad.read_zarr(path)
    assert_equal(back.uns[KEY], adata.uns[KEY])


def test_batch_metrics_plot(adapted_by_batch):
    import matplotlib

    matplotlib.use("Agg")
    adata, _ = adapted_by_batch
    fig = sck.pl.batch_metrics(adata, return_fig=True, show=False)
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0 or p.get_width() > 0]
    assert len(bars) >= 3
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_manifest_records_split(adapted_by_batch):
    import json
    from pathlib import Path

    adata, _ = adapted_by_batch
    manifest = json.loads((Path(adata.uns[KEY]["runner_dir"]) / "manifest.json").read_text())
    assert manifest["split"]["split_by"] == "batch"
    assert manifest["split"]["test_batches"] == ["d3"]
    assert manifest["init_params"]["batch_key"] == "donor"
    assert len(manifest["batch_metrics"]) == 3
