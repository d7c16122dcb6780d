from __future__ import annotations

import json
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal

import scdlkit as sck
from scdlkit.foundation import STRATEGIES, LoRAConfig, ScGPTAnnotationRunner

KEY = "scgpt_annotation"
FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False}


@pytest.fixture(scope="module")
def adapted(_pbmc_raw, checkpoint_dir, tmp_path_factory):
    """All eight strategies through sck.tl.adapt_annotation on pbmc68k_reduced (once)."""
    adata = _pbmc_raw.copy()
    labels = adata.obs["bulk_labels"].astype(object)
    labels.iloc[:7] = np.nan  # unlabelled cells still get predictions
    adata.obs["bulk_labels"] = labels
    out = tmp_path_factory.mktemp("run")
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=STRATEGIES,
        output_dir=out,
        **FAST,
    )
    return adata, out


def test_all_strategies_write_every_slot(adapted):
    adata, out = adapted
    assert isinstance(adata.obs[KEY].dtype, pd.CategoricalDtype)
    assert adata.obs[KEY].notna().all()
    conf = adata.obs[f"{KEY}_confidence"]
    assert ((conf > 0) & (conf <= 1)).all()
    split = adata.obs[f"{KEY}_split"]
    assert set(split.cat.categories) == {"train", "val", "calibration", "test", "unlabelled"}
    assert (split.iloc[:7] == "unlabelled").all()
    assert (split.iloc[7:] != "unlabelled").all()
    assert adata.obsm[f"X_{KEY}"].shape[0] == adata.n_obs
    uns = adata.uns[KEY]
    assert uns["best_strategy"] in STRATEGIES
    assert list(uns["label_categories"]) == list(
        adata.obs["bulk_labels"].astype("category").cat.categories
    )
    assert uns["runner_dir"] == str(out / "runner")
    assert set(uns["params"]["strategies"]) == set(STRATEGIES)
    metrics = uns["strategy_metrics"]
    assert list(metrics["strategy"]) == list(STRATEGIES)
    for col in ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr"):
        assert np.isfinite(metrics[f"validation_{col}"]).all(), col
        assert np.isfinite(metrics[f"test_{col}"]).all(), col
    assert (metrics["trainable_parameters"] > 0).all()
    assert (metrics["runtime_sec"] > 0).all()
    assert set(uns["history"]) == {
        "head",
        "full_finetune",
        "lora",
        "adapter",
        "prefix_tuning",
        "ia3",
    }
    assert "scdlkit" in uns["versions"]
    # the winner is the one ranked first on validation macro-F1
    assert metrics.loc[metrics["validation_macro_f1"].idxmax(), "validation_macro_f1"] == float(
        metrics.set_index("strategy").loc[uns["best_strategy"], "validation_macro_f1"]
    )


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_slots_round_trip(adapted, tmp_path, fmt):
    adata, _ = adapted
    path = tmp_path / f"a.{fmt}"
    getattr(adata, f"write_{fmt}")(path)
    back = ad.read_h5ad(path) if fmt == "h5ad" else ad.read_zarr(path)
    assert_equal(back.uns[KEY], adata.uns[KEY])
    for col in (KEY, f"{KEY}_confidence", f"{KEY}_split"):
        pd.testing.assert_series_equal(back.obs[col], adata.obs[col])
    np.testing.assert_array_equal(back.obsm[f"X_{KEY}"], adata.obsm[f"X_{KEY}"])


def test_artifacts(adapted):
    adata, out = adapted
    metrics = pd.read_csv(out / "strategy_metrics.csv")
    assert list(metrics["strategy"]) == list(STRATEGIES)
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == adata.n_obs
    assert (preds["predicted"].to_numpy() == adata.obs[KEY].astype(str).to_numpy()).all()
    report = (out / "report.md").read_text()
    assert f"Best strategy: `{adata.uns[KEY]['best_strategy']}`" in report
    assert "baseline" in report
    assert "705 of 765" in report
    for png in ("strategy_comparison.png", "confusion_matrix.png", "training_history.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) > 5000
    manifest = json.loads((out / "runner" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["best_strategy"] == adata.uns[KEY]["best_strategy"]


def test_annotate_query_from_runner_dir(adapted, _pbmc_raw):
    adata, _ = adapted
    query = _pbmc_raw[:50].copy()
    del query.obs["bulk_labels"]
    sck.tl.annotate(query, adata.uns[KEY]["runner_dir"])
    # the saved model (refitted on every labelled cell when the winner is closed-form) labels
    # the query; the reference's own labels come from the model evaluated on held-out cells
    runner = sck.AnnotationRunner.load(adata.uns[KEY]["runner_dir"])
    expected = runner.predict(_pbmc_raw[:50].copy())
    np.testing.assert_array_equal(query.obs[KEY].astype(str).to_numpy(), expected["labels"])
    np.testing.assert_allclose(
        query.obs[f"{KEY}_confidence"], expected["probabilities"].max(axis=1), rtol=1e-5
    )
    if not adata.uns[KEY]["final_models"][runner.best_strategy_]["refit"]:
        np.testing.assert_array_equal(
            query.obs[KEY].astype(str).to_numpy(),
            adata.obs[KEY].iloc[:50].astype(str).to_numpy(),
        )
    assert (query.obs[f"{KEY}_split"] == "query").all()
    assert query.uns[KEY]["best_strategy"] == adata.uns[KEY]["best_strategy"]


@pytest.fixture(scope="module")
def small_ref(_pbmc_raw):
    rng = np.random.default_rng(0)
    return _pbmc_raw[np.sort(rng.choice(_pbmc_raw.n_obs, 160, replace=False))].copy()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_predicts_identically(strategy, small_ref, checkpoint_dir, tmp_path):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=(strategy,), **FAST
    ).fit(small_ref)
    before = runner.predict(small_ref)
    runner.save(tmp_path / "r")
    loaded = ScGPTAnnotationRunner.load(tmp_path / "r", device="cpu")
    after = loaded.predict(small_ref)
    assert loaded.best_strategy_ == strategy
    np.testing.assert_array_equal(after["labels"], before["labels"])
    np.testing.assert_array_equal(after["probabilities"], before["probabilities"])
    np.testing.assert_array_equal(after["latent"], before["latent"])
    pd.testing.assert_frame_equal(loaded.strategy_metrics_, runner.strategy_metrics_)
    loaded.save(tmp_path / "again")  # a loaded runner saves again and still predicts the same
    again = ScGPTAnnotationRunner.load(tmp_path / "again", device="cpu").predict(small_ref)
    np.testing.assert_array_equal(again["probabilities"], before["probabilities"])


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.fixture(scope="module")
def saved_lora(small_ref, checkpoint_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "runner"
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("lora",),
        strategy_configs={"lora": LoRAConfig(rank=2)},
        precision="fp32",  # the tests below compare chunked/backed/sharded runs exactly
        **FAST,
    ).fit(small_ref)
    runner.save(path)
    return runner, path


def _copy_runner(src, dest):
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_pickled_weights_are_refused(saved_lora, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, src = saved_lora
    path = _copy_runner(src, tmp_path / "r")
    manifest = json.loads((path / "manifest.json").read_text())
    weights = path / manifest["weights_file"]
    weights.write_bytes(pickle.dumps({"model.x": _Payload()}))
    with pytest.raises(ValueError, match="sha256"):
        ScGPTAnnotationRunner.load(path)
    # an attacker who also rewrites the recorded hash still gets no unpickling
    import hashlib

    manifest["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ"):
        ScGPTAnnotationRunner.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_interrupted_save_keeps_previous(saved_lora, small_ref, tmp_path, monkeypatch):
    runner, src = saved_lora
    path = _copy_runner(src, tmp_path / "r")
    expected = ScGPTAnnotationRunner.load(path).predict(small_ref)["probabilities"]
    import scdlkit.foundation._runner_io as runner_io

    def crash(*args, **kwargs):
        msg = "disk full"
        raise OSError(msg)

    monkeypatch.setattr(runner_io.json, "dumps", crash)
    runner._best.model.cls_decoder.out_layer.bias.data += 1.0  # a different model to save
    try:
        with pytest.raises(OSError, match="disk full"):
            runner.save(path)
    finally:
        runner._best.model.cls_decoder.out_layer.bias.data -= 1.0
    monkeypatch.undo()
    again = ScGPTAnnotationRunner.load(path).predict(small_ref)["probabilities"]
    np.testing.assert_array_equal(again, expected)


def test_bad_manifest_and_other_base_checkpoint(saved_lora, tmp_path, checkpoint_copy):
    import torch

    _, src = saved_lora
    path = _copy_runner(src, tmp_path / "r")
    state = torch.load(checkpoint_copy / "best_model.pt", weights_only=True)
    state["value_encoder.linear1.bias"] = state["value_encoder.linear1.bias"] + 0.1
    torch.save(state, checkpoint_copy / "best_model.pt")
    with pytest.raises(ValueError, match="differs"):
        ScGPTAnnotationRunner.load(path, checkpoint=checkpoint_copy)
    ScGPTAnnotationRunner.load(path, checkpoint=checkpoint_copy, verify_checkpoint=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema_version"):
        ScGPTAnnotationRunner.load(path)
    del manifest["best_strategy"]
    manifest["schema_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="best_strategy"):
        ScGPTAnnotationRunner.load(path)


def test_wrong_order_calls(checkpoint_dir, small_ref, tmp_path):
    runner = ScGPTAnnotationRunner(label_key="bulk_labels", checkpoint=checkpoint_dir)
    for call in (
        lambda: runner.predict(small_ref),
        lambda: runner.annotate_adata(small_ref),
        lambda: runner.save(tmp_path / "x"),
    ):
        with pytest.raises(RuntimeError, match="fit"):
            call()


def test_confidence_threshold_and_annotate_adata(small_ref, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe",),
        confidence_threshold=0.9,
        **FAST,
    ).fit(small_ref)
    out = runner.predict(small_ref)
    unsure = out["probabilities"].max(axis=1) < 0.9
    assert unsure.any()
    assert (out["labels"][unsure] == "Unknown").all()
    assert (out["label_codes"][unsure] == -1).all()
    query = small_ref.copy()
    runner.annotate_adata(query)
    assert "Unknown" in query.obs["scgpt_label"].cat.categories
    assert query.obsm["X_scgpt_best"].shape == (query.n_obs, 32)


def test_same_seed_same_metrics(small_ref, checkpoint_dir):
    def fit():
        return ScGPTAnnotationRunner(
            label_key="bulk_labels",
            checkpoint=checkpoint_dir,
            strategies=("frozen_probe", "head", "baseline"),
            **FAST,
        ).fit(small_ref)

    a, b = fit(), fit()
    cols = [c for c in a.strategy_metrics_.columns if c != "runtime_sec"]
    pd.testing.assert_frame_equal(a.strategy_metrics_[cols], b.strategy_metrics_[cols])


def _scale(adata):
    adata.X.data[::5] *= -1


def _one_class(adata):
    adata.obs["bulk_labels"] = "T"


def _ensembl(adata):
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (None, {"strategies": ("head", "magic")}, ValueError, "unknown strategy 'magic'"),
        (None, {"strategy_configs": {"lora": {"rank": 4}}}, ValueError, "not in strategies"),
        (
            None,
            {"strategies": ("lora",), "strategy_configs": {"lora": {}}, "lora_config": {}},
            ValueError,
            "not both",
        ),
        (
            None,
            {"strategies": ("lora",), "strategy_configs": {"lora": {"rank": 0}}},
            ValueError,
            "rank",
        ),
        (None, {"label_key": "cell_type"}, KeyError, "label_key"),
        (_one_class, {}, ValueError, "at least 2"),
        (_scale, {}, ValueError, "negative"),
        (_ensembl, {}, ValueError, "gene_key"),
        (None, {"training": {"epoch": 3}}, ValueError, "unknown setting"),
    ],
)
def test_error_battery_leaves_adata_unchanged(
    small_ref, checkpoint_dir, mutate, kwargs, error, match
):
    adata = small_ref.copy()
    if mutate is not None:
        mutate(adata)
    before = adata.copy()
    args = {"label_key": "bulk_labels", **kwargs}
    with pytest.raises(error, match=match):
        sck.tl.adapt_annotation(
            adata, args.pop("label_key"), checkpoint=checkpoint_dir, **args, **FAST
        )
    assert_equal(adata, before)


def test_top_level_aliases():
    from scdlkit import foundation

    assert sck.AnnotationRunner is foundation.ScGPTAnnotationRunner
    assert sck.adapt_annotation is foundation.adapt_scgpt_annotation
    assert sck.inspect_annotation_data is foundation.inspect_annotation_data
    assert foundation.ScGPTLoRAConfig is foundation.LoRAConfig


def test_backed_query_predicts_like_in_memory(saved_lora, small_ref, tmp_path):
    runner, _ = saved_lora
    expected = runner.predict(small_ref)
    small_ref.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    got = runner.predict(backed, chunk_size=45)
    backed.file.close()
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(
        got["probabilities"], expected["probabilities"], rtol=1e-5, atol=1e-7
    )


def test_tl_annotate_backed_writes_results_that_survive_write_h5ad(saved_lora, small_ref, tmp_path):
    runner, _ = saved_lora
    expected = sck.tl.annotate(small_ref, runner, copy=True)
    small_ref.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    sck.tl.annotate(backed, runner, chunk_size=45)
    backed.write_h5ad(tmp_path / "annotated.h5ad")
    backed.file.close()
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    np.testing.assert_array_equal(
        back.obs["scgpt_annotation"].to_numpy(), expected.obs["scgpt_annotation"].to_numpy()
    )
    np.testing.assert_allclose(
        back.obsm["X_scgpt_annotation"], expected.obsm["X_scgpt_annotation"], rtol=1e-5, atol=1e-6
    )


def test_tl_annotate_refuses_backed_view_and_backed_copy_before_work(
    saved_lora, small_ref, tmp_path
):
    runner, _ = saved_lora
    small_ref.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    with pytest.raises(ValueError, match="view of a backed AnnData"):
        sck.tl.annotate(backed[:10], runner)
    with pytest.raises(ValueError, match="not possible for a backed"):
        sck.tl.annotate(backed, runner, copy=True)
    assert "scgpt_annotation" not in backed.obs
    assert "X_scgpt_annotation" not in backed.obsm
    backed.file.close()


def test_sharded_prediction_over_two_processes(saved_lora, small_ref, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, runner_dir = saved_lora
    single = ScGPTAnnotationRunner.load(runner_dir, device="cpu").predict(small_ref)
    small_ref.write_h5ad(tmp_path / "query.h5ad")
    script = Path(__file__).parent / "_shard_script.py"
    command = [sys.executable, str(script), "predict", str(runner_dir)]
    subprocess.run([*command, str(tmp_path / "query.h5ad"), str(tmp_path)], check=True, timeout=300)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npy")
        # fp32: the same up to rounding (each process batches a different share of the cells)
        np.testing.assert_allclose(got, single["probabilities"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(1), single["probabilities"].argmax(1))


def test_fit_runs_the_preflight_first_and_tokenises_with_its_gene_match(
    small_ref, checkpoint_dir, monkeypatch
):
    """The genes are matched once, before tokenising, and the tokeniser is handed that match;
    the report's expressed-gene counts are the tokens' own."""
    import dataclasses

    from scdlkit.foundation.models import MODELS

    card = MODELS["scgpt"]
    calls = []

    def match_genes(*args, **kwargs):
        calls.append("match")
        return card.match_genes(*args, **kwargs)

    def tokenize(*args, match=None, **kwargs):
        calls.append(("tokenize", match is not None))
        return card.tokenize(*args, match=match, **kwargs)

    monkeypatch.setitem(
        MODELS, "scgpt", dataclasses.replace(card, match_genes=match_genes, tokenize=tokenize)
    )
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=("frozen_probe",), **FAST
    ).fit(small_ref)
    assert calls == ["match", ("tokenize", True)]
    counts = runner.prepared_.tokens.n_genes_per_cell
    assert runner.report_.expressed_genes_max == int(counts.max())
    assert runner.report_.expressed_genes_median == float(np.median(counts))
    assert runner.report_.n_genes_matched == len(runner.matched_genes_)
    monkeypatch.undo()
    alone = sck.inspect_annotation_data(
        small_ref, label_key="bulk_labels", checkpoint=checkpoint_dir
    )
    assert runner.report_.to_dict() == alone.to_dict()  # the same report, one read fewer


def test_a_runner_saved_before_the_model_registry_loads_as_scgpt(saved_lora, small_ref, tmp_path):
    """Manifests written before the model seam name no model, d_model or resolve options."""
    _, src = saved_lora
    path = _copy_runner(src, tmp_path / "old")
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("model", "d_model", "options"):
        manifest["checkpoint"].pop(key)
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = ScGPTAnnotationRunner.load(path)
    assert loaded.checkpoint_.model_name == "scgpt"
    as_saved = ScGPTAnnotationRunner.load(src)  # the same files with the model named
    np.testing.assert_array_equal(
        loaded.predict(small_ref)["probabilities"], as_saved.predict(small_ref)["probabilities"]
    )
