"""The strategy registry: one family per strategy name, each saving and rebuilding on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scdlkit._shared.strategies import FEATURE_STRATEGIES, NEURAL_STRATEGIES, STRATEGIES
from scdlkit.foundation import ScGPTAnnotationRunner
from scdlkit.foundation._fitting import (
    BaseWeights,
    ExpressionBaseline,
    FrozenProbe,
    NeuralStrategy,
    register_strategy,
    strategy_family,
)

FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


def test_every_strategy_name_has_one_family():
    families = {name: strategy_family(name) for name in STRATEGIES}
    assert isinstance(families["frozen_probe"], FrozenProbe)
    assert isinstance(families["baseline"], ExpressionBaseline)
    for name in NEURAL_STRATEGIES:
        assert isinstance(families[name], NeuralStrategy)
    assert {n for n, f in families.items() if f.uses_features} == set(FEATURE_STRATEGIES)
    assert [n for n, f in families.items() if not f.uses_checkpoint] == ["baseline"]


def test_registry_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown strategy 'tuned'"):
        strategy_family("tuned")
    with pytest.raises(ValueError, match="not a strategy name"):
        register_strategy("tuned", FrozenProbe())


@pytest.fixture(scope="module")
def fitted(_pbmc_raw, checkpoint_dir, tmp_path_factory):
    """frozen_probe, head, lora and baseline fitted once, with training overrides given."""
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "head", "lora", "baseline"),
        training={"lora": {"lr": 5e-3}},
        early_stopping_patience=1,
        **FAST,
    ).fit(_pbmc_raw)
    return runner, tmp_path_factory.mktemp("registry")


@pytest.mark.parametrize("strategy", ["frozen_probe", "head", "lora", "baseline"])
def test_family_state_round_trip_predicts_identically(fitted, strategy, _pbmc_raw):
    runner, _ = fitted
    result = runner.results_[strategy]
    family = strategy_family(strategy)
    if result.model is None:  # only the kept model stays in memory: refit this one alone
        alone = ScGPTAnnotationRunner(
            label_key="bulk_labels",
            checkpoint=runner.checkpoint_.path,
            strategies=(strategy,),
            **FAST,
        ).fit(_pbmc_raw)
        result = alone.results_[strategy]
        runner = alone
    manifest = json.loads(json.dumps(family.manifest_fields(result.model)))
    rebuilt = family.from_state(
        strategy, family.state(result.model), manifest, BaseWeights(runner.checkpoint_)
    )
    cells = _pbmc_raw[:50].copy()
    expected = runner.predict(cells)
    runner._best.model = rebuilt
    got = runner.predict(cells)
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-6)


def test_loaded_runner_reports_the_saved_params(fitted):
    runner, folder = fitted
    runner.save(folder / "runner")
    loaded = ScGPTAnnotationRunner.load(folder / "runner")
    assert loaded.params() == runner.params()
    # the overrides really are the ones used, not defaults
    assert loaded.params()["training"]["lora"]["lr"] == 5e-3
    assert loaded.params()["training"]["head"]["early_stopping_patience"] == 1
    assert loaded.init_params_ == runner.init_params_


def test_recorded_paths_are_absolute(checkpoint_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, output_dir="od", progress=False
    )
    assert runner.init_params_["output_dir"] == str(tmp_path / "od")
    assert runner.init_params_["checkpoint"] == str(checkpoint_dir.resolve())


def test_no_validation_cells_is_refused_before_any_training(_pbmc_raw, checkpoint_dir, monkeypatch):
    from scdlkit.foundation import _fitting

    def no_training(*args, **kwargs):
        msg = "a strategy was fitted"
        raise AssertionError(msg)

    monkeypatch.setattr(_fitting.FrozenProbe, "fit", no_training)
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "head"),
        val_size=0.0,
        **FAST,
    )
    with pytest.raises(ValueError, match=r"no validation cells \(val_size=0.0\) to rank 2"):
        runner.fit(_pbmc_raw)


def test_class_weight_reaches_every_strategy(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "head", "baseline"),
        class_weight="balanced",
        **FAST,
    )
    training = runner.params()["training"]
    assert {name: s["class_weight"] for name, s in training.items()} == {
        "frozen_probe": "balanced",
        "head": "balanced",
        "baseline": "balanced",
    }
    alone = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe",),
        class_weight="balanced",
        **FAST,
    ).fit(_pbmc_raw)
    assert alone.results_["frozen_probe"].model.probe.class_weight == "balanced"
    with pytest.raises(ValueError, match="class_weight only"):
        ScGPTAnnotationRunner(label_key="x", training={"baseline": {"lr": 1.0}})


def test_batch_split_trains_on_every_non_test_batch(_pbmc_raw, checkpoint_dir):
    from scdlkit.foundation import prepare_scgpt_data, split_scgpt_data

    adata = _pbmc_raw.copy()
    adata.obs["donor"] = np.array(["d1", "d2", "d3"])[np.arange(adata.n_obs) % 3]
    prepared = prepare_scgpt_data(
        adata, checkpoint=checkpoint_dir, label_key="bulk_labels", batch_key="donor"
    )
    split = split_scgpt_data(prepared, split_by="batch", test_batches=["d3"])
    donors = prepared.batches
    assert set(donors[split.train_indices]) == {"d1", "d2"}
    assert set(donors[split.val_indices]) == {"d1", "d2"}
    assert set(donors[split.test_indices]) == {"d3"}
    assert split.val_batches == []
    named = split_scgpt_data(prepared, split_by="batch", test_batches=["d3"], val_batches=["d2"])
    assert set(donors[named.train_indices]) == {"d1"}
