"""Two foundation models compared in one call on pbmc68k: one row per (model, strategy), the same
cells for every model, the best on validation cells labels the data, and the plot shows them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scdlkit as sck

matplotlib.use("Agg")

DATA = Path(__file__).parent / "data"
SCGPT = DATA / "scgpt-tiny-pbmc-pretrained" / "checkpoint"
GENEFORMER = DATA / "geneformer-tiny-v2" / "checkpoint"


def pbmc_counts() -> ad.AnnData:
    """pbmc68k_reduced's counts, as ``benchmarks/two_models_pbmc.py`` recovers them."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "two_models_pbmc.py"
    spec = importlib.util.spec_from_file_location("scdlkit_benchmarks_two_models_pbmc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pbmc_counts()


def geneformer_cells(fixture: Path, *, seed: int, empty_first: bool = False) -> ad.AnnData:
    """90 cells of raw counts over 150 of a Geneformer fixture's genes (duplicated ids dropped),
    3 types each marked by 10 genes; ``empty_first`` leaves the first cell without counts."""
    var = ad.read_h5ad(fixture / "data.h5ad").var.drop_duplicates("ensembl_id").iloc[:150]
    rng = np.random.default_rng(seed)
    labels = np.repeat(list("abc"), 30)
    counts = rng.poisson(0.3, (90, 150)).astype(np.float32)
    for k, label in enumerate("abc"):
        counts[labels == label, k * 10 : k * 10 + 10] += rng.poisson(8.0, (30, 10))
    if empty_first:
        counts[0] = 0
    return ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(90)]),
        var=var,
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[ad.AnnData, Path]:
    adata = pbmc_counts()
    out = tmp_path_factory.mktemp("two-models")
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=[SCGPT, GENEFORMER],
        strategies=("frozen_probe", "head", "baseline"),
        device="cpu",
        precision="fp32",
        epochs=2,
        output_dir=out,
    )
    return adata, out


def test_one_row_per_model_and_strategy(compared: tuple[ad.AnnData, Path]) -> None:
    adata, out = compared
    uns = adata.uns["scgpt_annotation"]
    metrics = pd.DataFrame(uns["strategy_metrics"])
    rows = set(zip(metrics["model"], metrics["strategy"], strict=True))
    assert rows == {
        ("scgpt", "frozen_probe"),
        ("scgpt", "head"),
        ("expression", "baseline"),
        ("geneformer", "frozen_probe"),
        ("geneformer", "head"),
    }
    assert set(uns["models"]) == {"scgpt", "geneformer"}
    best = metrics.loc[metrics["validation_macro_f1"].idxmax()]
    assert uns["best_strategy"] == best["strategy"]
    assert uns["model"] == ("scgpt" if best["model"] == "expression" else best["model"])
    for label, title in (("scgpt", "scGPT"), ("geneformer", "Geneformer")):
        assert (out / label / "runner" / "manifest.json").is_file()
        report = (out / label / "report.md").read_text()
        assert report.startswith(f"# {title} cell-type annotation report")
        assert f"Model: {title}, checkpoint" in report
    # the labels come from the kept model, whose runner tl.annotate reuses
    assert adata.obs["scgpt_annotation"].notna().all()
    query = adata[:50].copy()
    sck.tl.annotate(query, uns["runner_dir"])
    assert query.uns["scgpt_annotation"]["strategy"] == uns["best_strategy"]
    known = {*adata.obs["bulk_labels"].astype(str), "Unknown"}
    assert set(query.obs["scgpt_annotation"].astype(str)) <= known


def test_every_model_saw_the_same_cells(compared: tuple[ad.AnnData, Path]) -> None:
    adata, out = compared
    splits = {
        label: pd.read_csv(out / label / "predictions.csv").set_index("cell")["split"]
        for label in ("scgpt", "geneformer")
    }
    pd.testing.assert_series_equal(splits["scgpt"], splits["geneformer"])
    assert set(splits["scgpt"]) == {"train", "val", "test", "calibration"}
    kept = adata.obs["scgpt_annotation_split"].astype(str)
    assert (kept.to_numpy() == splits["scgpt"].loc[adata.obs_names].to_numpy()).all()


def test_models_on_different_cells_are_refused() -> None:
    from types import SimpleNamespace

    from scdlkit.foundation._model_comparison import _same_splits

    def runner(test: list[int]) -> SimpleNamespace:
        cells = {"train": [0, 1], "val": [2], "test": test, "calibration": []}
        split = SimpleNamespace(indices=lambda name: np.asarray(cells[name]))
        return SimpleNamespace(split_=split)

    _same_splits({"a": runner([3]), "b": runner([3])})
    with pytest.raises(RuntimeError, match="test cells of 'b' differ"):
        _same_splits({"a": runner([3]), "b": runner([4])})


def test_the_comparison_plot_names_each_model(compared: tuple[ad.AnnData, Path], tmp_path):
    adata, _ = compared
    fig = sck.pl.strategy_comparison(adata, return_fig=True, show=False)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 5
    assert {"scgpt · frozen_probe", "geneformer · head"} <= {
        s.replace(" (best)", "") for s in labels
    }
    assert any(label.endswith("(best)") for label in labels)
    fig.savefig(tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_the_comparison_round_trips(compared: tuple[ad.AnnData, Path], tmp_path) -> None:
    adata, _ = compared
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(
        pd.DataFrame(back.uns["scgpt_annotation"]["strategy_metrics"]),
        pd.DataFrame(adata.uns["scgpt_annotation"]["strategy_metrics"]),
        check_dtype=False,
    )
    assert back.uns["scgpt_annotation"]["model"] == adata.uns["scgpt_annotation"]["model"]


def test_one_checkpoint_is_not_a_comparison() -> None:
    with pytest.raises(ValueError, match="two or more checkpoints"):
        sck.foundation.adapt_models(
            pbmc_counts(), checkpoints=[SCGPT], strategies=("head",), label_key="bulk_labels"
        )


def test_a_geneformer_v1_cell_without_genes_is_embedded_as_zero_and_labelled_unknown(tmp_path):
    """V1 pools by averaging gene tokens; a cell with none must not become NaN (it would break
    every strategy); it gets a zero embedding and, in the tools, the unknown label."""
    folder = DATA / "geneformer-tiny-v1"
    adata = geneformer_cells(folder, seed=0, empty_first=True)
    embedded = adata.copy()
    sck.tl.embed(
        embedded,
        checkpoint=folder / "checkpoint",
        gene_key="ensembl_id",
        key_added="gf",
        progress=False,
        precision="fp32",
    )
    emb = embedded.obsm["X_gf"]
    assert np.isfinite(emb).all()
    np.testing.assert_array_equal(emb[0], 0.0)
    sck.tl.adapt_annotation(
        adata,
        "cell_type",
        checkpoint=folder / "checkpoint",
        gene_key="ensembl_id",
        strategies=("frozen_probe", "head"),
        epochs=2,
        device="cpu",
        precision="fp32",
        output_dir=tmp_path / "run",
    )
    assert np.isfinite(adata.obsm["X_scgpt_annotation"]).all()
    assert np.isfinite(adata.obs["scgpt_annotation_confidence"]).all()
    assert adata.obs["scgpt_annotation"].iloc[0] == "Unknown"


def test_a_geneformer_runner_remembers_dictionaries_kept_elsewhere(tmp_path):
    """Dictionaries passed with dictionaries= (outside the folders searched) are recorded in the
    manifest, so the saved runner loads from its folder alone and predicts the same."""
    import shutil

    from scdlkit.foundation.models.geneformer import resolve_geneformer_checkpoint

    source = DATA / "geneformer-tiny-v2"
    shutil.copytree(source / "checkpoint", tmp_path / "models" / "ckpt")
    shutil.copytree(source / "dictionaries", tmp_path / "elsewhere")
    ckpt = resolve_geneformer_checkpoint(
        tmp_path / "models" / "ckpt", dictionaries=tmp_path / "elsewhere"
    )
    adata = geneformer_cells(source, seed=1)
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=ckpt,
        gene_key="ensembl_id",
        strategies=("frozen_probe",),
        device="cpu",
        precision="fp32",
        progress=False,
        output_dir=tmp_path / "run",
    ).fit(adata)
    back = sck.AnnotationRunner.load(tmp_path / "run" / "runner")
    np.testing.assert_array_equal(
        back.predict(adata)["probabilities"], runner.predict(adata)["probabilities"]
    )


def test_a_runner_saved_before_the_model_registry_loads_as_scgpt(tmp_path):
    """Manifests written before the registry have no checkpoint.model, d_model or options: they
    are scGPT's, and load and predict as before."""
    import json

    adata = pbmc_counts()[::3].copy()
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=SCGPT,
        strategies=("frozen_probe",),
        device="cpu",
        precision="fp32",
        progress=False,
        output_dir=tmp_path / "run",
    ).fit(adata)
    folder = tmp_path / "run" / "runner"
    manifest = json.loads((folder / "manifest.json").read_text())
    for field in ("model", "d_model", "options"):
        del manifest["checkpoint"][field]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    back = sck.AnnotationRunner.load(folder)
    assert back.checkpoint_.model_name == "scgpt"
    np.testing.assert_array_equal(
        back.predict(adata)["probabilities"], runner.predict(adata)["probabilities"]
    )


def test_upstream_recipe_is_refused_for_a_model_without_one(tmp_path):
    """training="upstream" reproduces scGPT's and scPEFT's recipes: with Geneformer it would train
    with another model's recipe under that name, so it is refused before any work."""
    adata = ad.read_h5ad(DATA / "geneformer-tiny-v2" / "data.h5ad")
    with pytest.raises(ValueError, match="Geneformer's own fine-tuning recipe is not wired"):
        sck.AnnotationRunner(
            label_key="cell_type",
            checkpoint=GENEFORMER,
            gene_key="ensembl_id",
            strategies=("lora",),
            training="upstream",
        ).fit(adata)


def test_a_moved_geneformer_checkpoint_loads_from_its_new_folder(tmp_path):
    """The recorded dictionary paths are stale once the checkpoint moves: the new folder is
    searched instead (the sha256 pins still prove it is the same checkpoint), for the best and
    for every other kept model."""
    import shutil

    source = DATA / "geneformer-tiny-v2"
    shutil.copytree(source / "checkpoint", tmp_path / "a" / "ckpt")
    shutil.copytree(source / "dictionaries", tmp_path / "a" / "dictionaries")
    adata = geneformer_cells(source, seed=2)
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=tmp_path / "a" / "ckpt",
        gene_key="ensembl_id",
        strategies=("frozen_probe", "head"),
        epochs=2,
        keep="all",
        device="cpu",
        precision="fp32",
        progress=False,
        output_dir=tmp_path / "run",
    ).fit(adata)
    (tmp_path / "a").rename(tmp_path / "b")
    back = sck.AnnotationRunner.load(
        tmp_path / "run" / "runner", checkpoint=tmp_path / "b" / "ckpt"
    )
    for strategy in ("frozen_probe", "head"):
        np.testing.assert_allclose(
            back.predict(adata, strategy=strategy)["probabilities"],
            runner.predict(adata, strategy=strategy)["probabilities"],
            rtol=0,
            atol=1e-6,
        )


def test_a_query_sharing_few_genes_with_the_model_is_refused(tmp_path):
    """The number of shared genes needed is capped by what the model could read (its vocabulary),
    not by what the query happens to share."""
    adata = pbmc_counts()[::4].copy()
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=SCGPT,
        strategies=("frozen_probe",),
        device="cpu",
        precision="fp32",
        progress=False,
    ).fit(adata)
    few = adata[:, :5].copy()
    with pytest.raises(ValueError, match="need at least 100"):
        runner.predict(few)


def test_two_checkpoints_of_one_model_get_numbered_labels():
    from scdlkit.foundation._model_comparison import _labels

    scgpt, v1, v2 = (
        sck.foundation.resolve_model_checkpoint(c)
        for c in (SCGPT, DATA / "geneformer-tiny-v1" / "checkpoint", GENEFORMER)
    )
    assert _labels([scgpt, v1, v2]) == ["scgpt", "geneformer_1", "geneformer_2"]
    with pytest.raises(ValueError, match="name one checkpoint twice"):
        _labels([v2, v2])
