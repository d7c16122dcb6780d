"""The strategy registry: one family per strategy name, each saving and rebuilding on its own."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from scdlkit._shared.strategies import FEATURE_STRATEGIES, NEURAL_STRATEGIES, STRATEGIES
from scdlkit.foundation import ScGPTAnnotationRunner
from scdlkit.foundation._fitting import BaseWeights
from scdlkit.foundation.models.scgpt._model import ScGPTSelfAttention
from scdlkit.foundation.strategies import register_strategy, strategy_family
from scdlkit.foundation.strategies.expression_baseline import ExpressionBaseline
from scdlkit.foundation.strategies.frozen_probe import FrozenProbe
from scdlkit.foundation.strategies.neural import NeuralStrategy

FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


def test_every_strategy_name_has_one_family():
    families = {name: strategy_family(name) for name in STRATEGIES}
    assert isinstance(families["frozen_probe"], FrozenProbe)
    assert isinstance(families["baseline"], ExpressionBaseline)
    for name in NEURAL_STRATEGIES:
        assert isinstance(families[name], NeuralStrategy)
    assert {n for n, f in families.items() if f.uses_features} == set(FEATURE_STRATEGIES)
    assert [n for n, f in families.items() if not f.uses_checkpoint] == ["baseline"]


def test_one_table_line_registers_a_strategy():
    """Each line of STRATEGY_KINDS is the whole registration: the family comes from the file the
    kind names, and a "peft" line's method from ``foundation/peft/<name>.py``."""
    from scdlkit._shared.strategies import PEFT_STRATEGIES, STRATEGY_KINDS
    from scdlkit.foundation.peft import PEFT_METHODS

    assert tuple(STRATEGY_KINDS) == STRATEGIES
    for name, kind in STRATEGY_KINDS.items():
        file = "neural" if kind == "peft" else kind
        assert type(strategy_family(name)).__module__ == f"scdlkit.foundation.strategies.{file}"
    assert tuple(n for n, k in STRATEGY_KINDS.items() if k == "peft") == PEFT_STRATEGIES
    for name in PEFT_STRATEGIES:
        assert PEFT_METHODS[name].apply.__module__ == f"scdlkit.foundation.peft.{name}"


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
    runner._best.model = result.model  # the selection fit (the kept one may be refitted)
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
    from scdlkit.foundation.strategies import frozen_probe as _fitting

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


def test_repeats_give_means_sds_and_per_repeat_rows(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "baseline"),
        n_repeats=3,
        **FAST,
    ).fit(_pbmc_raw)
    repeats = runner.repeat_metrics_
    assert sorted(repeats["repeat"].unique()) == [0, 1, 2]
    assert len(repeats) == 6
    summary = runner.strategy_metrics_.set_index("strategy")
    for name in ("frozen_probe", "baseline"):
        mine = repeats[repeats["strategy"] == name]
        assert summary.loc[name, "test_macro_f1"] == pytest.approx(mine["test_macro_f1"].mean())
        assert summary.loc[name, "test_macro_f1_sd"] == pytest.approx(
            mine["test_macro_f1"].std(ddof=1)
        )
        assert summary.loc[name, "test_macro_f1_sd"] > 0  # three different splits
    assert summary.loc["baseline", "test_macro_f1_vs_baseline"] == 0
    diff = summary.loc["frozen_probe", "test_macro_f1_vs_baseline"]
    assert summary.loc["frozen_probe", "test_macro_f1_vs_baseline_t_ci_low"] < diff
    assert diff < summary.loc["frozen_probe", "test_macro_f1_vs_baseline_t_ci_high"]
    best = summary["validation_macro_f1"].idxmax()
    assert runner.best_strategy_ == best
    # the kept model and split are the first repeat's: the same as a single-repeat fit
    single = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "baseline"),
        **FAST,
    ).fit(_pbmc_raw)
    np.testing.assert_array_equal(single.split_.test_indices, runner.split_.test_indices)
    first = repeats[repeats["repeat"] == 0].set_index("strategy")["test_macro_f1"]
    np.testing.assert_allclose(
        single.strategy_metrics_.set_index("strategy")["test_macro_f1"],
        first[["frozen_probe", "baseline"]],
    )


def test_one_repeat_gives_bootstrap_intervals(fitted):
    runner, _ = fitted
    metrics = runner.strategy_metrics_.set_index("strategy")
    low, high = metrics["test_macro_f1_boot_ci_low"], metrics["test_macro_f1_boot_ci_high"]
    assert ((low <= metrics["test_macro_f1"]) & (metrics["test_macro_f1"] <= high)).all()
    assert (high - low > 0).all()
    assert metrics.loc["baseline", "test_macro_f1_vs_baseline"] == 0
    assert np.isfinite(metrics["test_macro_f1_vs_baseline"]).all()


def test_boot_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    from scdlkit.foundation._selection import _boot_macro_f1

    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 5, 60), rng.integers(0, 6, 60)
    draws = rng.integers(0, 60, size=(20, 60))
    got = _boot_macro_f1(labels, predicted, draws)
    want = [f1_score(labels[d], predicted[d], average="macro", zero_division=0) for d in draws]
    np.testing.assert_allclose(got, want)


def test_a_class_named_unknown_is_refused_before_training(_pbmc_raw, checkpoint_dir):
    adata = _pbmc_raw.copy()
    adata.obs["bulk_labels"] = adata.obs["bulk_labels"].cat.rename_categories(
        {"Dendritic": "Unknown"}
    )
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("baseline",),
        confidence_threshold=0.5,
        **FAST,
    )
    with pytest.raises(ValueError, match="a class is named 'Unknown'"):
        runner.fit(adata)
    assert not hasattr(runner, "results_")


def test_threshold_metrics_beside_the_plain_ones(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("baseline",),
        confidence_threshold=0.9,
        val_size=0.0,
        **FAST,
    ).fit(_pbmc_raw)
    row = runner.strategy_metrics_.iloc[0]
    plain = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("baseline",),
        val_size=0.0,
        **FAST,
    ).fit(_pbmc_raw)
    assert row["test_accuracy"] == plain.strategy_metrics_.iloc[0]["test_accuracy"]
    assert 0 < row["test_unknown_share"] < 1
    assert row["test_called_accuracy"] >= row["test_accuracy"]


def test_report_shows_the_noise_and_the_paired_difference(_pbmc_raw, checkpoint_dir, tmp_path):
    ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe", "baseline"),
        n_repeats=2,
        output_dir=tmp_path / "run",
        **FAST,
    ).fit(_pbmc_raw)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Noise" in report
    assert "fitted 2 times (seeds 42 to 43) on one fixed test set" in report
    assert "Nadeau and Bengio's correction" in report
    assert "(t interval over repeats). These are 1 comparison at once" in report
    table = report.split("These are 1 comparison at once")[1]
    assert "| frozen_probe |" in table
    metrics = pd.read_csv(tmp_path / "run" / "strategy_metrics.csv")
    assert {
        "test_macro_f1_sd",
        "test_macro_f1_t_ci_low",
        "test_macro_f1_vs_baseline",
        "test_macro_f1_vs_baseline_t_ci_high",
    } <= set(metrics.columns)


def test_small_data_gets_enough_optimiser_steps():
    from scdlkit.foundation._training_settings import resolve_training, stretch_to_min_steps

    settings = resolve_training("lora", None, {})
    assert settings["min_steps"] == 2000
    budget = stretch_to_min_steps(settings, steps_per_epoch=6)
    assert budget["epochs"] == 334  # 334 x 6 >= 2,000 steps
    assert "min_steps" not in budget
    # the rate decays over the run as over the recipe's 10 epochs; the patience waits at most
    # 100 steps (17 epochs of 6), not 3 of the stretched run's 10 "recipe epochs" (101 epochs)
    assert budget["lr_decay"] ** 334 == pytest.approx(0.9**10)
    assert budget["early_stopping_patience"] == 17
    # large data: the epochs already give the steps, nothing changes
    assert stretch_to_min_steps(settings, steps_per_epoch=250)["epochs"] == 10
    # an explicit epochs means exactly that many epochs
    assert resolve_training("lora", None, {"epochs": 1})["min_steps"] == 0
    assert resolve_training("lora", {"lora": {"epochs": 2}}, {})["min_steps"] == 0
    both = resolve_training("lora", {"epochs": 2, "min_steps": 40}, {})
    assert stretch_to_min_steps(both, steps_per_epoch=5)["epochs"] == 8


def test_every_neural_classifier_input_is_standardised(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=("lora",), **FAST
    ).fit(_pbmc_raw)
    norm = runner.results_["lora"].model.feature_norm
    train = runner.split_.indices("train")
    features = runner._features[train]
    assert not torch.equal(norm.shift, torch.zeros_like(norm.shift))
    # fitted on the frozen training features that early stopping did not hold out
    assert norm.scale.min() > 0
    assert float((norm.shift - torch.as_tensor(features.mean(0))).abs().max()) < 0.05


def test_encoder_dropout_reaches_the_encoder_only(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("lora",),
        strategy_configs={"lora": {"dropout": 0.3}},
        training={"encoder_dropout": 0.05},
        **{**FAST, "attention_dropout": None},
    ).fit(_pbmc_raw)
    model = runner.results_["lora"].model
    assert runner.results_["lora"].training["encoder_dropout"] == 0.05
    encoder_rates = {
        name: m.p
        for name, m in model.encoder.named_modules()
        if isinstance(m, torch.nn.Dropout) and "lora" not in name
    }
    assert len(encoder_rates) > 3
    assert set(encoder_rates.values()) == {0.05}, encoder_rates
    attention = [m.dropout for m in model.encoder.modules() if isinstance(m, ScGPTSelfAttention)]
    assert len(attention) > 0
    assert set(attention) == {0.05}
    # the adaptation's own dropout and the classifier's are their own settings
    lora_rates = {m.p for n, m in model.encoder.named_modules() if "lora" in n and hasattr(m, "p")}
    assert lora_rates == {0.3}
    assert model.dropout.p == model.classifier_dropout


@pytest.mark.parametrize(
    "training",
    [
        {"encoder_dropout": 1.0},
        {"lora": {"encoder_dropout": "none"}},
        {"head": {"encoder_dropout": 0}},
    ],
)
def test_bad_encoder_dropout_is_refused_before_training(training, checkpoint_dir):
    with pytest.raises(ValueError, match="encoder_dropout"):
        ScGPTAnnotationRunner(
            label_key="bulk_labels", checkpoint=checkpoint_dir, training=training, **FAST
        )
