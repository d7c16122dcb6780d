"""Issue 24 item 7: a name that claims a recipe is that recipe. ``training="upstream"`` trains
with the published settings; the model settings it needs (raw ``<cls>`` input, no classifier
dropout, the recipe's batch size, Adafactor for IA3) reach the model and the Trainer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scdlkit as sck
from scdlkit.foundation._input_norm import RawInput, make_input_norm
from scdlkit.foundation._training_settings import (
    DEFAULT_TRAINING,
    UPSTREAM_TRAINING,
    check_training_overrides,
    resolve_training,
)
from scdlkit.training import Trainer
from scdlkit.training._schedule import build_optimizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _planted():
    name = "scdlkit_benchmarks_planted_signal"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "planted_signal.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_upstream_recipe_is_the_published_settings():
    overrides = check_training_overrides("training", "upstream")
    assert overrides == {"recipe": "upstream"}
    full = resolve_training("full_finetune", overrides, {})
    # scGPT's annotation tutorial: Adam eps 1e-4, lr 1e-4 for everything, StepLR 0.9, 10 epochs,
    # batch 32, the checkpoint's dropout, no early stopping, raw <cls> into the head
    assert full["optimizer"] == "adam"
    assert full["adam_eps"] == 1e-4
    assert (full["lr"], full["head_lr"], full["lr_decay"], full["epochs"]) == (1e-4, None, 0.9, 10)
    assert (full["batch_size"], full["encoder_dropout"]) == (32, None)
    assert full["early_stopping_patience"] is None
    assert full["min_steps"] == 0
    assert (full["input_norm"], full["classifier_dropout"]) == ("none", 0.0)
    for name in ("lora", "adapter", "prefix_tuning"):  # scPEFT's tutorial
        peft = resolve_training(name, overrides, {})
        assert (peft["lr"], peft["epochs"], peft["batch_size"]) == (5e-5, 20, 50)
        assert peft["early_stopping_patience"] == 15
    ia3 = resolve_training("ia3", overrides, {})  # T-Few
    assert (ia3["optimizer"], ia3["lr"], ia3["batch_size"]) == ("adafactor", 3e-3, 8)
    assert ia3["min_steps"] == ia3["max_steps"] == 1000
    # the default recipe is unchanged by the existence of another
    assert resolve_training("full_finetune", None, {}) == {**DEFAULT_TRAINING["full_finetune"]}


def test_a_recipe_takes_overrides_and_refuses_unknown_names():
    settings = resolve_training("lora", {"recipe": "upstream", "lora": {"lr": 1e-3}}, {"epochs": 2})
    assert (settings["lr"], settings["epochs"], settings["batch_size"]) == (1e-3, 2, 50)
    with pytest.raises(ValueError, match="'published' is not one of 'scdlkit', 'upstream'"):
        check_training_overrides("training", "published")
    with pytest.raises(TypeError, match="a recipe name"):
        check_training_overrides("training", 3)
    # any strategy's per-strategy settings may name a setting another recipe has
    assert check_training_overrides("training", {"lora": {"batch_size": 16}}) == {
        "lora": {"batch_size": 16}
    }
    assert set(UPSTREAM_TRAINING) == set(DEFAULT_TRAINING)


def test_raw_input_norm_is_the_identity():
    norm = make_input_norm("none", 8)
    assert isinstance(norm, RawInput)
    x = torch.randn(3, 8)
    assert norm.fit(x) is norm
    assert torch.equal(norm(x), x)


def test_adafactor_is_offered_without_eps():
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(
        model, model, lr=3e-3, head_lr=None, weight_decay=0.0, optimizer="adafactor", eps=1e-4
    )
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert optimizer.param_groups[0]["lr"] == 3e-3


def test_upstream_runner_trains_with_the_recipe_settings(monkeypatch):
    planted = _planted()
    adata = planted.planted_signal_adata(n_cells=60)
    seen: dict[str, dict] = {}
    real_init = Trainer.__init__

    def init(self, model, **kwargs):
        seen[model.tuning_strategy] = {**kwargs, "model": model}
        real_init(self, model, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", init)
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=planted.RANDOM_CHECKPOINT,
        strategies=("full_finetune", "ia3"),
        training={"recipe": "upstream", "epochs": 1, "ia3": {"min_steps": 2, "max_steps": 2}},
        precision="fp32",
        progress=False,
        random_state=0,
    ).fit(adata)
    full, ia3 = seen["full_finetune"], seen["ia3"]
    assert (full["batch_size"], full["optimizer"], full["adam_eps"]) == (32, "adam", 1e-4)
    assert (ia3["batch_size"], ia3["optimizer"]) == (8, "adafactor")
    for kwargs in (full, ia3):
        model = kwargs["model"]
        assert isinstance(model.feature_norm, RawInput)
        assert model.classifier_dropout == 0.0
        # the checkpoint's encoder dropout (0.2) is kept while training
        assert any(
            isinstance(m, torch.nn.Dropout) and m.p == pytest.approx(0.2)
            for m in model.encoder.modules()
        )
    recorded = runner.results_["full_finetune"].training
    assert recorded["batch_size"] == 32
    assert recorded["input_norm"] == "none"
    saved = runner.predict(adata)["probabilities"]
    assert np.isfinite(saved).all()


def test_a_refit_forgets_the_earlier_save(tmp_path):
    planted = _planted()
    adata = planted.planted_signal_adata(n_cells=60)
    runner = sck.AnnotationRunner(
        label_key="cell_type",
        checkpoint=planted.RANDOM_CHECKPOINT,
        strategies=("frozen_probe",),
        progress=False,
        random_state=0,
    ).fit(adata)
    runner.save(tmp_path / "runner")
    assert runner.runner_dir_ is not None
    assert runner.manifest_sha256_ is not None
    runner.fit(adata)
    assert runner.runner_dir_ is None
    assert runner.manifest_sha256_ is None
