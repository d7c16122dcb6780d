"""Labels with a stated error rate: split-conformal prediction sets (class-conditional),
temperature scaling, the calibration cells, and their slots, plots and round trips."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal

import scdlkit as sck
from scdlkit.cli import main
from scdlkit.foundation._conformal import (
    ConformalCalibration,
    conformal_metrics,
    expected_calibration_error,
    fit_temperature,
    scale_probabilities,
)

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}


# ------------------------------------------------------------------------------ the method


def _exchangeable(n: int, n_classes: int, seed: int, sharpen: float = 1.0):
    """Probabilities and labels drawn from them (sharpen > 1: an overconfident model)."""
    rng = np.random.default_rng(seed)
    true = rng.dirichlet(np.full(n_classes, 0.6), size=n)
    labels = np.array([rng.choice(n_classes, p=p) for p in true])
    shown = true**sharpen
    return shown / shown.sum(axis=1, keepdims=True), labels


def test_thresholds_are_the_finite_sample_quantile_of_each_class():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.05, 0.15])
    labels = np.array([0] * 9 + [1] * 2)
    cal = ConformalCalibration(scores=scores, labels=labels, n_classes=2)
    thresholds, fallback = cal.thresholds(0.2)
    # class 0: n=9, rank ceil(10 * 0.8) = 8 -> the 8th smallest score, 0.8
    assert thresholds[0] == pytest.approx(0.8)
    # class 1: n=2 is too few (rank ceil(3 * 0.8) = 3 > 2): the marginal threshold, rank
    # ceil(12 * 0.8) = 10 of all 11 scores
    assert fallback.tolist() == [False, True]
    assert thresholds[1] == pytest.approx(np.sort(scores)[9])
    marginal, _ = cal.thresholds(0.2, mondrian=False)
    assert np.allclose(marginal, np.sort(scores)[9])
    # a set holds class c when 1 - p_c <= q_c
    sets = cal.prediction_sets(np.array([[0.25, 0.75], [0.1, 0.9], [0.95, 0.05]]), 0.2)
    assert sets.tolist() == [[True, True], [False, True], [True, False]]


def test_coverage_holds_per_class_on_exchangeable_cells():
    proba, labels = _exchangeable(24_000, 4, seed=0)
    cal = ConformalCalibration.fit(proba[:4000], labels[:4000])
    test_p, test_y = proba[4000:], labels[4000:]
    sets = cal.prediction_sets(test_p, 0.1)
    covered = sets[np.arange(len(test_y)), test_y]
    assert abs(covered.mean() - 0.9) < 0.015
    for c in range(4):
        assert covered[test_y == c].mean() >= 0.9 - 0.025
    metrics = conformal_metrics(cal, test_p, test_y)
    assert metrics["coverage"] == pytest.approx(covered.mean())
    assert metrics["set_size"] == pytest.approx(sets.sum(axis=1).mean())
    assert metrics["set_unknown_share"] == pytest.approx((sets.sum(axis=1) != 1).mean())


def test_temperature_scaling_cools_an_overconfident_model_and_keeps_its_labels():
    proba, labels = _exchangeable(6000, 5, seed=1, sharpen=3.0)
    temperature = fit_temperature(proba[:3000], labels[:3000])
    assert temperature > 1.5
    scaled = scale_probabilities(proba[3000:], temperature)
    assert (scaled.argmax(axis=1) == proba[3000:].argmax(axis=1)).all()
    before = expected_calibration_error(proba[3000:], labels[3000:])
    after = expected_calibration_error(scaled, labels[3000:])
    assert after < before / 2


# ------------------------------------------------------------------------------ the runner


@pytest.fixture(scope="module")
def calibrated(_pbmc_raw, fixture_dir, tmp_path_factory):
    """baseline and frozen_probe on pbmc68k with the pretrained fixture, saved."""
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=fixture_dir.parent / "scgpt-tiny-pbmc-pretrained" / "checkpoint",
        strategies=("baseline", "frozen_probe"),
        random_state=0,
        **FAST,
    ).fit(_pbmc_raw)
    runner.save(tmp_path_factory.mktemp("calibrated") / "runner")
    return runner


def test_calibration_cells_neither_train_nor_choose(calibrated):
    split = calibrated.split_
    cal = split.calibration_indices
    assert len(cal) == calibrated.split_summary_["n_calibration"] == 70  # 10% of 700
    for other in (split.train_indices, split.val_indices, split.test_indices):
        assert not np.intersect1d(cal, other).size
    assert (split.split_labels()[cal] == "calibration").all()
    metrics = calibrated.strategy_metrics_.set_index("strategy")
    for column in ("test_coverage", "test_set_size", "test_ece", "test_ece_scaled"):
        assert metrics[column].notna().all()
    assert ((metrics["test_coverage"] > 0) & (metrics["test_coverage"] <= 1)).all()
    # the refitted winner is fitted on every labelled cell but the calibration cells
    record = calibrated.final_models_[calibrated.best_strategy_]
    assert record["n_cells"] == 700 - 70
    assert record["fitted_on"] == "all labelled cells but the calibration cells"


def test_annotate_with_an_error_rate_writes_sets_through_h5ad_zarr_and_save_load(
    calibrated, _pbmc_raw, tmp_path
):
    query = _pbmc_raw[::3].copy()
    sck.tl.annotate(query, calibrated.runner_dir_, error_rate=0.1)
    sets = query.obsm[f"{KEY}_prediction_set"]
    assert isinstance(sets, pd.DataFrame)
    assert sets.dtypes.eq(bool).all()
    size = sets.to_numpy().sum(axis=1)
    np.testing.assert_array_equal(query.obs[f"{KEY}_set_size"], size)
    labels = query.obs[KEY].astype(str).to_numpy()
    categories = list(calibrated.label_categories_)
    single = size == 1
    np.testing.assert_array_equal(
        labels[single], np.asarray(categories)[sets.to_numpy()[single].argmax(axis=1)]
    )
    assert (labels[~single] == "Unknown").all()
    record = query.uns[KEY]["conformal"]
    assert record["error_rate"] == 0.1
    assert record["n_calibration_cells"] == 70
    assert record["method"].startswith("split conformal, class-conditional")
    assert list(record["classes"]["label"]) == categories
    # the same sets from the runner in memory and from its folder
    expected = calibrated.conformal_calibration().prediction_sets(
        calibrated.predict(_pbmc_raw[::3].copy())["probabilities"], 0.1
    )
    np.testing.assert_array_equal(sets.to_numpy(), expected)
    query.write_h5ad(tmp_path / "q.h5ad")
    query.write_zarr(tmp_path / "q.zarr")
    for back in (ad.read_h5ad(tmp_path / "q.h5ad"), ad.read_zarr(tmp_path / "q.zarr")):
        np.testing.assert_array_equal(back.obsm[f"{KEY}_prediction_set"].to_numpy(), expected)
        assert back.uns[KEY]["conformal"]["error_rate"] == 0.1


def test_an_error_rate_too_small_for_the_calibration_cells_gives_full_sets(
    calibrated, _pbmc_raw, tmp_path
):
    query = _pbmc_raw[:30].copy()
    # 70 calibration cells: rank ceil(71 * 0.999) = 71 > 70, no finite threshold at all
    sck.tl.annotate(query, calibrated, error_rate=0.001)
    assert query.obsm[f"{KEY}_prediction_set"].to_numpy().all()
    assert (query.obs[KEY] == "Unknown").all()
    assert np.isinf(query.uns[KEY]["conformal"]["classes"]["threshold"]).all()
    query.write_h5ad(tmp_path / "q.h5ad")  # an infinite threshold is a number h5ad stores
    assert np.isinf(
        ad.read_h5ad(tmp_path / "q.h5ad").uns[KEY]["conformal"]["classes"]["threshold"]
    ).all()


def test_a_smaller_error_rate_gives_larger_sets(calibrated, _pbmc_raw):
    cal = calibrated.conformal_calibration()
    proba = calibrated.predict(_pbmc_raw[::4].copy())["probabilities"]
    sizes = [cal.prediction_sets(proba, a).sum(axis=1).mean() for a in (0.3, 0.1, 0.02)]
    assert sizes[0] <= sizes[1] <= sizes[2]


def test_error_rate_refusals_leave_the_anndata_unchanged(calibrated, _pbmc_raw, fixture_dir):
    query = _pbmc_raw[:40].copy()
    before = query.copy()
    with pytest.raises(ValueError, match="not both"):
        sck.tl.annotate(query, calibrated, error_rate=0.1, confidence_threshold=0.5)
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="error_rate"):
            sck.tl.annotate(query, calibrated, error_rate=bad)
    uncalibrated = sck.AnnotationRunner(
        label_key="bulk_labels",
        strategies=("baseline",),
        checkpoint=fixture_dir.parent / "scgpt-tiny-pbmc-pretrained" / "checkpoint",
        calibration_size=0,
        **FAST,
    ).fit(_pbmc_raw)
    with pytest.raises(ValueError, match=r"no conformal calibration.*calibration_size > 0"):
        sck.tl.annotate(query, uncalibrated, error_rate=0.1)
    assert_equal(query, before)


def _donor_baseline(fixture_dir, **batches):
    """The baseline on pbmc68k split by ``obs["donor"]``, donor d held out for test."""
    return sck.AnnotationRunner(
        label_key="bulk_labels",
        strategies=("baseline",),
        checkpoint=fixture_dir.parent / "scgpt-tiny-pbmc-pretrained" / "checkpoint",
        batch_key="donor",
        split_by="batch",
        test_batches=["d"],
        **batches,
        **FAST,
    )


def test_donor_held_out_calibration_uses_whole_batches(_pbmc_raw, fixture_dir):
    adata = _pbmc_raw.copy()
    adata.obs["donor"] = np.array(["a", "b", "c", "d"])[np.arange(adata.n_obs) % 4]
    with pytest.warns(
        UserWarning, match=r"calibrated on one batch \('b'\).*not for a new batch"
    ) as caught:
        runner = _donor_baseline(fixture_dir, val_batches=["c"], calibration_batches=["b"]).fit(
            adata
        )
    assert {w.filename for w in caught if "one batch" in str(w.message)} == {__file__}
    donors = adata.obs["donor"].to_numpy()
    assert set(donors[runner.split_.calibration_indices]) == {"b"}
    assert set(donors[runner.split_.train_indices]) == {"a"}
    assert runner.split_summary_["calibration_batches"] == ["b"]
    # the refitted baseline never sees a cell of the calibration donor
    assert runner.final_models_["baseline"] == {
        "strategy": "baseline",
        "fitted_on": "all labelled cells but those of the calibration batches",
        "n_cells": int((donors != "b").sum()),
        "refit": True,
    }
    with pytest.raises(ValueError, match="also test or validation batches"):
        _donor_baseline(fixture_dir, calibration_batches=["d"]).fit(adata)


def test_calibration_plot_and_coverage_bars(calibrated, _pbmc_raw, tmp_path):
    adata = _pbmc_raw.copy()
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=calibrated.checkpoint_.path,
        strategies=("baseline", "frozen_probe"),
        random_state=0,
        **FAST,
    )
    fig = sck.pl.calibration(adata, return_fig=True, show=False)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0] == "calibrated"
    assert any(label.startswith("baseline") and "ECE" in label for label in labels)
    assert len(ax.collections) == 2  # one scatter per strategy
    fig.savefig(tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    plt.close(fig)
    fig = sck.pl.strategy_comparison(adata, metric="coverage", return_fig=True, show=False)
    assert any(
        np.allclose(line.get_xdata(), 0.9) and line.get_linestyle() == "--"
        for line in fig.axes[0].get_lines()
    )
    plt.close(fig)
    with pytest.raises(ValueError, match="test cells only"):
        sck.pl.strategy_comparison(adata, metric="coverage", split="validation", show=False)


def test_cli_annotate_with_an_error_rate(calibrated, _pbmc_raw, tmp_path):
    _pbmc_raw[:80].copy().write_h5ad(tmp_path / "q.h5ad")
    code = main(
        [
            "annotate",
            str(tmp_path / "q.h5ad"),
            "--runner",
            str(calibrated.runner_dir_),
            "--error-rate",
            "0.1",
            "-o",
            str(tmp_path / "out.h5ad"),
            "-q",
        ]
    )
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns[KEY]["params"]["error_rate"] == 0.1
    assert f"{KEY}_prediction_set" in out.obsm


def test_temperature_scaling_and_voting_with_an_error_rate(calibrated, _pbmc_raw):
    query = _pbmc_raw[::2].copy()
    plain = query.copy()
    sck.tl.annotate(plain, calibrated)
    sck.tl.annotate(
        query,
        calibrated,
        temperature_scaling=True,
        error_rate=0.1,
        majority_voting=True,
        over_clustering="louvain" if "louvain" in query.obs else None,
    )
    temperature = calibrated.conformal_calibration().temperature
    assert query.uns[KEY]["params"]["temperature"] == pytest.approx(temperature)
    scaled = query.obsm[f"{KEY}_probabilities"].to_numpy()
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-5)
    unscaled = plain.obsm[f"{KEY}_probabilities"].to_numpy()
    np.testing.assert_array_equal(scaled.argmax(axis=1), unscaled.argmax(axis=1))
    # the sets come from the unscaled probabilities, whatever the scaling
    expected = calibrated.conformal_calibration().prediction_sets(unscaled, 0.1)
    np.testing.assert_array_equal(query.obsm[f"{KEY}_prediction_set"].to_numpy(), expected)
    # the vote counts the set-based labels ("Unknown" included) within each cluster
    assert f"{KEY}_majority_voting" in query.obs


def test_a_saved_calibration_that_does_not_fit_the_classes_is_refused(calibrated, tmp_path):
    import copy

    broken = copy.copy(calibrated)
    broken._best = copy.copy(calibrated._best)
    calibration = copy.deepcopy(calibrated.conformal_calibration())
    calibration.labels[0] = len(calibrated.label_categories_) + 3  # a class that does not exist
    broken._best.extra = {**calibrated._best.extra, "conformal": calibration}
    broken._kept = {calibrated.best_strategy_: broken._best}  # what save reads (kept_result)
    broken.kept_strategies_ = [calibrated.best_strategy_]
    folder = broken.save(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"conformal calibration \(conformal\.\*\) does not hold"):
        sck.AnnotationRunner.load(folder)
