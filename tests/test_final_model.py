"""The model a runner labels with: refitted on every labelled cell (``refit=``), every strategy
kept (``keep="all"``), and runs without held-out cells (``val_size=0, test_size=0``)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scdlkit as sck
from scdlkit.cli import main

FAST = {"progress": False, "precision": "fp32"}
KEY = "scgpt_annotation"


@pytest.fixture(scope="module")
def pretrained(fixture_dir):
    return fixture_dir.parent / "scgpt-tiny-pbmc-pretrained" / "checkpoint"


@pytest.fixture(scope="module")
def kept_all(_pbmc_raw, pretrained, tmp_path_factory):
    """baseline, frozen_probe and head on pbmc68k, every model kept and refitted, saved."""
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=pretrained,
        strategies=("baseline", "frozen_probe", "head"),
        keep="all",
        refit="always",
        random_state=0,
        training={"head": {"epochs": 5, "min_steps": 20}},
        **FAST,
    ).fit(_pbmc_raw)
    runner.save(tmp_path_factory.mktemp("kept") / "runner")
    return runner


def _baseline(adata, pretrained, refit):
    return sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=pretrained,
        strategies=("baseline",),
        refit=refit,
        random_state=0,
        **FAST,
    ).fit(adata)


def test_refit_auto_fits_a_closed_form_winner_on_every_labelled_cell(pbmc_raw, pretrained):
    pbmc_raw.obs.loc[pbmc_raw.obs_names[:20], "bulk_labels"] = np.nan  # unlabelled: never fitted
    refitted = _baseline(pbmc_raw, pretrained, "auto")
    held = _baseline(pbmc_raw, pretrained, "never")
    labelled = int(pbmc_raw.obs["bulk_labels"].notna().sum())
    calibration = refitted.split_.calibration_indices
    assert len(calibration) == round(0.1 * labelled)
    assert refitted.final_models_["baseline"] == {
        "strategy": "baseline",
        "fitted_on": "all labelled cells but the calibration cells",
        "n_cells": labelled - len(calibration),
        "refit": True,
    }
    assert held.final_models_["baseline"]["fitted_on"] == "training cells"
    assert held.final_models_["baseline"]["n_cells"] < len(refitted.split_.train_indices)
    # the reported metrics are the held-out evaluation's, the same with or without the refit
    pd.testing.assert_frame_equal(
        refitted.strategy_metrics_.drop(columns="runtime_sec"),
        held.strategy_metrics_.drop(columns="runtime_sec"),
    )
    # the reference's own labels come from the selection fit: test cells stay held out
    np.testing.assert_array_equal(
        refitted.reference_predictions()["probabilities"],
        held.reference_predictions()["probabilities"],
    )
    # new cells are labelled by the refitted model, which differs from the selection fit
    query = pbmc_raw[:60].copy()
    assert not np.allclose(
        refitted.predict(query)["probabilities"], held.predict(query)["probabilities"]
    )


def test_refit_auto_leaves_trained_strategies_and_always_refits_them(kept_all, _pbmc_raw):
    record = kept_all.final_models_["head"]
    steps = int(kept_all.results_["head"].extra["best_step"])
    assert record == {
        "strategy": "head",
        "fitted_on": "all labelled cells but the calibration cells",
        "n_cells": _pbmc_raw.n_obs - len(kept_all.split_.calibration_indices),
        "refit": True,
        "steps": steps,
    }
    trainer = kept_all.kept_result("head").training["trainer"]
    assert trainer["max_steps"] == steps
    assert trainer["early_stopping_patience"] is None
    auto = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=kept_all.checkpoint_.path,
        strategies=("head",),
        random_state=0,
        training={"head": {"epochs": 5, "min_steps": 20}},
        **FAST,
    ).fit(_pbmc_raw)
    assert auto.final_models_["head"]["refit"] is False


def test_keep_all_labels_with_every_strategy_and_survives_save_load(kept_all):
    back = sck.AnnotationRunner.load(kept_all.runner_dir_)
    assert back.kept_strategies_[0] == kept_all.best_strategy_
    assert sorted(back.kept_strategies_) == ["baseline", "frozen_probe", "head"]
    assert (kept_all.runner_dir_ / "strategies").is_dir()
    assert back.final_models_ == json.loads(json.dumps(kept_all.final_models_))


def test_every_kept_strategy_predicts_the_same_after_loading(kept_all, _pbmc_raw):
    back = sck.AnnotationRunner.load(kept_all.runner_dir_)
    query = _pbmc_raw[::7].copy()
    seen = {}
    for name in ("baseline", "frozen_probe", "head"):
        before = kept_all.predict(query, strategy=name)["probabilities"]
        after = back.predict(query, strategy=name)["probabilities"]
        np.testing.assert_array_equal(before, after)
        seen[name] = before
    assert not np.allclose(seen["baseline"], seen["head"])  # three models, not one
    np.testing.assert_array_equal(back.predict(query)["probabilities"], seen[back.best_strategy_])


def test_a_loaded_runner_saved_again_keeps_every_model(kept_all, _pbmc_raw, tmp_path):
    back = sck.AnnotationRunner.load(kept_all.runner_dir_)
    again = sck.AnnotationRunner.load(back.save(tmp_path / "again"))
    query = _pbmc_raw[::9].copy()
    for name in kept_all.kept_strategies_:
        np.testing.assert_array_equal(
            again.predict(query, strategy=name)["probabilities"],
            kept_all.predict(query, strategy=name)["probabilities"],
        )


def test_annotate_with_a_kept_strategy_records_it_through_h5ad(kept_all, _pbmc_raw, tmp_path):
    query = _pbmc_raw[::5].copy()
    other = next(s for s in kept_all.kept_strategies_ if s != kept_all.best_strategy_)
    sck.tl.annotate(query, kept_all.runner_dir_, strategy=other)
    expected = kept_all.predict(_pbmc_raw[::5].copy(), strategy=other)
    np.testing.assert_allclose(query.obs[f"{KEY}_confidence"], expected["probabilities"].max(1))
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    assert back.uns[KEY]["strategy"] == other
    assert back.uns[KEY]["best_strategy"] == kept_all.best_strategy_


def test_a_strategy_that_was_not_kept_is_refused_with_the_kept_ones(_pbmc_raw, pretrained):
    runner = _baseline(_pbmc_raw, pretrained, "auto")
    with pytest.raises(ValueError, match=r"'head' was not kept.*\['baseline'\].*keep='all'"):
        runner.predict(_pbmc_raw[:10].copy(), strategy="head")
    with pytest.raises(ValueError, match="keep"):
        sck.AnnotationRunner(label_key="x", keep="some")
    with pytest.raises(ValueError, match="refit"):
        sck.AnnotationRunner(label_key="x", refit=True)


def test_a_kept_model_edited_after_saving_is_refused(kept_all, tmp_path):
    import shutil

    copy = tmp_path / "runner"
    shutil.copytree(kept_all.runner_dir_, copy)
    manifest = copy / "strategies" / "head" / "manifest.json"
    record = json.loads(manifest.read_text())
    record["strategy_metrics"][0]["validation_accuracy"] = 0.0
    manifest.chmod(0o644)
    manifest.write_text(json.dumps(record))
    back = sck.AnnotationRunner.load(copy)
    with pytest.raises(ValueError, match="not the 'head' model saved with the runner"):
        back.kept_result("head")


def test_no_held_out_cells_with_output_dir_completes_through_the_cli(
    _pbmc_raw, pretrained, tmp_path
):
    _pbmc_raw.write_h5ad(tmp_path / "ref.h5ad")
    out = tmp_path / "out"
    code = main(
        [
            "adapt",
            str(tmp_path / "ref.h5ad"),
            "--label-key",
            "bulk_labels",
            "--checkpoint",
            str(pretrained),
            "--strategies",
            "baseline",
            "--val-size",
            "0",
            "--test-size",
            "0",
            "--output-dir",
            str(out),
            "-o",
            str(tmp_path / "annotated.h5ad"),
            "--precision",
            "fp32",
            "-q",
        ]
    )
    assert code == 0
    assert (out / "run_complete.json").is_file()
    report = (out / "report.md").read_text()
    assert "No test cells (test_size=0)" in report
    assert "refitted on 630 cells (all labelled cells but the calibration cells)" in report
    annotated = ad.read_h5ad(tmp_path / "annotated.h5ad")
    assert set(annotated.obs[f"{KEY}_split"].astype(str)) == {"train", "calibration"}
    assert annotated.uns[KEY]["final_models"]["baseline"]["n_cells"] == 630
    code = main(
        [
            "annotate",
            str(tmp_path / "ref.h5ad"),
            "--runner",
            str(out / "runner"),
            "-o",
            str(tmp_path / "query.h5ad"),
            "-q",
        ]
    )
    assert code == 0


def test_a_refitted_encoder_strategy_trains_exactly_the_steps_of_its_kept_weights(
    _pbmc_raw, pretrained, monkeypatch
):
    # one batch per epoch: the recipe's 10 epochs are 10 steps, far fewer than the kept step
    from scdlkit.training import Trainer

    fitted = []
    original = Trainer.fit

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        fitted.append((int(self.history_["step"].max()), self.best_step_))
        return out

    monkeypatch.setattr(Trainer, "fit", spy)
    rows = np.sort(np.random.default_rng(0).choice(_pbmc_raw.n_obs, 90, replace=False))
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=pretrained,
        strategies=("lora",),
        refit="always",
        random_state=0,
        batch_size=128,
        training={"lora": {"min_steps": 40, "early_stopping_patience": None}},
        **FAST,
    ).fit(_pbmc_raw[rows, :150].copy())
    steps = int(runner.results_["lora"].extra["best_step"])
    assert steps > 10  # more than the recipe's 10 one-step epochs
    assert runner.final_models_["lora"]["steps"] == steps
    # the selection fit ran 40 steps and kept the best; the refit ran exactly the kept steps
    # and keeps its last weights (without stop cells "best" would be the lowest training loss)
    assert fitted == [(40, steps), (steps, steps)]
    assert runner.kept_result("lora").training["keep"] == "last"
