"""The step budget (a floor, a cap, evaluation every ``eval_every`` steps on long epochs, the
warning for a stretched run) and a Trainer whose per-period validation is cheap but unchanged."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from anndata.tests.helpers import assert_equal
from sklearn import metrics as skm
from torch import nn

import scdlkit as sck
from scdlkit.foundation._training_settings import (
    EVAL_EVERY,
    MAX_PATIENCE_STEPS,
    MAX_STEPS,
    MIN_STEPS,
    STRETCH_WARNING_EPOCHS,
    check_training_overrides,
    resolve_training,
    step_budget,
    warn_if_stretched,
)
from scdlkit.foundation.strategies.neural import FeatureDataset
from scdlkit.training import Trainer
from scdlkit.training.metrics import classification_metrics, monitor_metrics

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "data" / "scgpt-tiny-flash" / "checkpoint"
D, C = 16, 4


class Features(FeatureDataset):
    """Cached features of four noisy classes (the ``head`` strategy's dataset)."""

    def __init__(self, n: int, *, seed: int) -> None:
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % C
        x = rng.normal(size=(n, D)) + 1.5 * np.eye(C, D)[labels]
        super().__init__(x.astype(np.float32), labels)


class NoBatches(Features):
    """The same cells without ``get_batch``: read item by item through a DataLoader."""

    get_batch = None


class Head(nn.Module):
    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))

    def forward(self, batch):
        return {"logits": self.net(batch["features"]), "latent": batch["features"]}


class Constant(nn.Module):
    """Logits that no step changes: the monitored loss never improves after the first period."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        logits = torch.zeros(len(batch["labels"]), C) + 0.0 * self.unused
        return {"logits": logits}


def _trainer(model: nn.Module | None = None, **kwargs) -> Trainer:
    defaults = {"batch_size": 16, "epochs": 6, "lr": 1e-2, "progress": False}
    defaults |= {"accelerator": "cpu", "precision": "fp32"}
    return Trainer(model if model is not None else Head(), **{**defaults, **kwargs})


def _history(trainer: Trainer) -> pd.DataFrame:
    return trainer.history_.drop(columns="seconds")


# ------------------------------------------------------------------------- the settings


def test_defaults_give_a_floor_a_cap_and_an_evaluation_period():
    lora = resolve_training("lora", None, {})
    assert (lora["min_steps"], lora["max_steps"], lora["eval_every"]) == (2000, 20_000, 2000)
    assert lora["max_patience_steps"] == MAX_PATIENCE_STEPS == 100
    assert resolve_training("full_finetune", None, {})["max_steps"] == MAX_STEPS
    head = resolve_training("head", None, {})
    assert head["min_steps"] == 0
    assert head["max_steps"] is None
    assert EVAL_EVERY == MAX_STEPS // 10  # a capped run is evaluated 10 times, as 10 epochs are


@pytest.mark.parametrize("steps_per_epoch", [1, 6, 7, 93, 199, 200, 201, 930, 2000, 2001, 9297])
def test_every_dataset_size_trains_between_the_floor_and_the_cap(steps_per_epoch):
    budget = step_budget(resolve_training("lora", None, {}), steps_per_epoch)
    planned = budget["epochs"] * steps_per_epoch
    steps = planned if budget["max_steps"] is None else budget["max_steps"]
    assert MIN_STEPS <= steps <= MAX_STEPS
    assert steps <= planned < steps + steps_per_epoch  # the last epoch is the one the cap ends
    # the rate decays over the run as over the recipe's 10 epochs (0.9 per recipe epoch); the
    # patience waits 3 of 10 recipe epochs, but at most MAX_PATIENCE_STEPS steps, and never
    # fewer than the recipe's 3 evaluations
    period = EVAL_EVERY if steps_per_epoch > EVAL_EVERY else steps_per_epoch
    evaluations = math.ceil(steps / period)
    assert budget["lr_decay"] ** evaluations == pytest.approx(0.9**10)
    share = math.ceil(3 * evaluations / 10)
    capped = max(3, math.ceil(MAX_PATIENCE_STEPS / period))
    assert budget["early_stopping_patience"] == min(share, capped)
    assert budget["early_stopping_patience"] >= 3


def test_the_patience_waits_at_most_max_patience_steps():
    settings = resolve_training("lora", None, {})
    # 700 cells (6 steps per epoch): up to 334 epochs, and a stop after 17 epochs (102 steps)
    # without improvement, not after 101 (3 of the stretched run's 10 "recipe epochs")
    budget = step_budget(settings, steps_per_epoch=6)
    assert budget["epochs"] == 334
    assert budget["early_stopping_patience"] == 17
    assert "max_patience_steps" not in budget  # the runner's setting, not the Trainer's
    # without the cap the patience keeps the same share of the stretched run
    uncapped = resolve_training("lora", {"max_patience_steps": None}, {})
    assert step_budget(uncapped, steps_per_epoch=6)["early_stopping_patience"] == 101
    # a cap shorter than the recipe's patience keeps the recipe's 3 evaluations
    short = resolve_training("lora", {"max_patience_steps": 1}, {})
    assert step_budget(short, steps_per_epoch=6)["early_stopping_patience"] == 3
    # where the floor does not stretch, the cap changes nothing (10 epochs of 930 steps), nor
    # on large data whose explicit epochs give many evaluation periods (50 epochs of 9,297
    # steps, evaluated every 2,000: 233 periods, the recipe's share of them)
    assert step_budget(settings, steps_per_epoch=930)["early_stopping_patience"] == 3
    long = resolve_training("lora", None, {"epochs": 50})
    assert step_budget(long, steps_per_epoch=9297)["early_stopping_patience"] == math.ceil(
        3 * 233 / 50
    )
    # full fine-tuning has the same cap; the recipes from papers have none
    assert resolve_training("full_finetune", None, {})["max_patience_steps"] == 100
    upstream = resolve_training("lora", {"recipe": "upstream"}, {})
    assert upstream.get("max_patience_steps") is None
    with pytest.raises(ValueError, match="max_patience_steps"):
        check_training_overrides("training", {"max_patience_steps": 0})


def test_the_cap_ends_a_whole_human_sized_run():
    budget = step_budget(resolve_training("lora", None, {}), steps_per_epoch=9297)  # 1M cells
    assert budget["max_steps"] == 20_000  # not 10 epochs = 92,970 steps
    assert budget["epochs"] == 3  # 2.15 epochs, the third ended by the cap
    # 10 evaluations of 2,000 steps: the recipe's decay and patience per evaluation
    assert budget["eval_every"] == 2000
    assert budget["lr_decay"] == 0.9
    assert budget["early_stopping_patience"] == 3
    # below the cap and above the floor the recipe runs as it is: 10 epochs of 930 steps
    settings = resolve_training("lora", None, {})
    runner_only = {"min_steps", "max_patience_steps"}
    expected = {k: v for k, v in settings.items() if k not in runner_only} | {"max_steps": None}
    assert step_budget(settings, 930) == expected


def test_explicit_epochs_mean_exactly_that_many_epochs():
    settings = resolve_training("lora", None, {"epochs": 30})
    assert settings["min_steps"] == 0
    assert settings["max_steps"] is None
    budget = step_budget(settings, steps_per_epoch=9297)
    assert budget["epochs"] == 30
    assert budget["max_steps"] is None
    # an explicit cap still applies with explicit epochs
    both = resolve_training("lora", {"lora": {"epochs": 30, "max_steps": 500}}, {})
    assert step_budget(both, steps_per_epoch=100)["max_steps"] == 500
    # the cap wins over the floor
    low = resolve_training("lora", {"max_steps": 200}, {})
    assert step_budget(low, steps_per_epoch=6)["max_steps"] == 200


def test_head_on_a_million_cells_evaluates_every_eval_every_steps():
    budget = step_budget(resolve_training("head", None, {}), steps_per_epoch=9297)
    assert budget["epochs"] == 50
    assert budget["max_steps"] is None
    evaluations = math.ceil(50 * 9297 / EVAL_EVERY)  # 233 periods of 2,000 steps
    assert budget["early_stopping_patience"] == math.ceil(10 * evaluations / 50)


def test_bad_max_steps_or_eval_every_is_refused_before_work(pbmc_raw):
    before = pbmc_raw.copy()
    for bad, error in ((0, ValueError), (2.5, TypeError)):
        for key in ("max_steps", "eval_every"):
            with pytest.raises(error, match=rf"training\['lora'\]\['{key}'\]"):
                sck.tl.adapt_annotation(
                    pbmc_raw,
                    "bulk_labels",
                    checkpoint=CHECKPOINT,
                    strategies=("lora",),
                    training={"lora": {key: bad}},
                    device="cpu",
                    progress=False,
                )
    assert_equal(pbmc_raw, before)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        _trainer(max_steps=0)


# ------------------------------------------------------------------------ the warning


def test_a_stretched_floor_warns_once_per_fit_and_strategy():
    settings = resolve_training("lora", {"min_steps": 2000}, {})  # 2,000 steps of 6: 334 epochs

    class Fit:
        pass

    fit = Fit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # repeats of one fit
            warn_if_stretched("lora", settings, 6, n_cells=357, batch_size=64, once_per=fit)
        warn_if_stretched("adapter", settings, 6, n_cells=357, batch_size=64, once_per=fit)
        warn_if_stretched("lora", settings, 6, n_cells=357, batch_size=64, once_per=Fit())
        # 21 epochs of 93 steps: stretched, but not past 50 epochs
        warn_if_stretched("ia3", settings, 93, n_cells=5950, batch_size=64, once_per=Fit())
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 3  # lora once, adapter once, lora again for another fit
    assert "strategy 'lora'" in messages[0]
    assert "strategy 'adapter'" in messages[1]
    for number in (
        "min_steps=2000",
        "from 10 to up to 334 epochs",
        "6 optimiser steps",
        "357 cells",
        "after 17 epochs, 102 steps, without improvement",
    ):
        assert number in messages[0]
    assert STRETCH_WARNING_EPOCHS == 50
    # the wait it names is the one the run will have; without early stopping it says so
    long_wait = resolve_training("lora", {"min_steps": 2000, "max_patience_steps": 1000}, {})
    never = resolve_training("lora", {"min_steps": 2000, "early_stopping_patience": None}, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_stretched("lora", long_wait, 6, n_cells=357, batch_size=64, once_per=Fit())
        warn_if_stretched("lora", never, 6, n_cells=357, batch_size=64, once_per=Fit())
    waits = [str(w.message) for w in caught]
    assert "after 101 epochs, 606 steps, without improvement" in waits[0]
    assert "with no early stopping" in waits[1]


def test_the_runner_warns_once_over_repeats(pbmc_raw):
    # few cells and genes (short token sequences) keep the 2 x 51 LoRA steps cheap
    rows = np.sort(np.random.default_rng(0).choice(pbmc_raw.n_obs, 80, replace=False))
    cells = pbmc_raw[rows, :150].copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = sck.AnnotationRunner(
            label_key="bulk_labels",
            checkpoint=CHECKPOINT,
            strategies=("lora",),
            # one step per epoch: a 51-step floor stretches 1 epoch to 51
            training={"lora": {"epochs": 1, "min_steps": 51}},
            batch_size=128,
            n_repeats=2,
            device="cpu",
            precision="fp32",
            progress=False,
        ).fit(cells)
    stretched = [str(w.message) for w in caught if "stretches training" in str(w.message)]
    assert len(stretched) == 1
    assert "strategy 'lora'" in stretched[0]
    assert "from 1 to up to 51 epochs" in stretched[0]
    history = runner.history_["lora"]
    assert history["step"].tolist() == history["epoch"].tolist() == list(range(1, 52))


# --------------------------------------------------------------------------- the Trainer


def test_max_steps_ends_training_mid_epoch():
    trainer = _trainer(epochs=10, max_steps=9).fit(Features(64, seed=0), Features(32, seed=1))
    # 4 steps per epoch: evaluated after epochs 1 and 2, then after step 9 in epoch 3
    assert trainer.history_["step"].tolist() == [4, 8, 9]
    assert trainer.history_["epoch"].tolist() == [1, 2, 3]
    # nine training forwards: nine optimiser steps
    model = Head()
    counted = []
    model.register_forward_hook(lambda *_: counted.append(1) if model.training else None)
    _trainer(model, epochs=10, max_steps=9).fit(Features(64, seed=0))
    assert len(counted) == 9


def test_long_epochs_are_evaluated_every_eval_every_steps():
    # 8 steps per epoch, an evaluation every 3 steps: periods end at steps 3, 6, 9, ... 24
    trainer = _trainer(epochs=3, eval_every=3, lr_decay=0.5, lr=0.1)
    trainer.fit(Features(128, seed=0), Features(32, seed=1))
    history = trainer.history_
    assert history["step"].tolist() == [3, 6, 9, 12, 15, 18, 21, 24]
    assert history["epoch"].tolist() == [1, 1, 2, 2, 2, 3, 3, 3]
    # the rate decays once per evaluation period
    np.testing.assert_allclose(history["lr"], 0.1 * 0.5 ** np.arange(8))
    assert trainer.best_step_ in history["step"].tolist()
    best = history.loc[history["step"] == trainer.best_step_].iloc[0]
    assert best["val_loss"] == history["val_loss"].min()
    assert trainer.best_epoch_ == best["epoch"]
    # the run's last period may be shorter: 2 epochs of 8 steps, every 5 -> 5, 10, 15, 16
    short = _trainer(epochs=2, eval_every=5).fit(Features(128, seed=0), Features(32, seed=1))
    assert short.history_["step"].tolist() == [5, 10, 15, 16]


def test_patience_counts_evaluation_periods():
    data = Features(128, seed=0)  # 8 steps per epoch
    trainer = _trainer(Constant(), epochs=5, eval_every=2, early_stopping_patience=3)
    trainer.fit(data, Features(32, seed=1))
    # the first period sets the best; three more without improvement stop the run at step 8
    assert trainer.history_["step"].tolist() == [2, 4, 6, 8]
    assert trainer.best_step_ == 2


def test_small_data_keeps_one_evaluation_per_epoch():
    train, val = Features(64, seed=0), Features(32, seed=1)  # 4 steps per epoch
    kwargs = {"epochs": 5, "lr_decay": 0.8, "early_stopping_patience": 2, "seed": 3}
    plain = _trainer(Head(seed=1), **kwargs).fit(train, val)
    default = _trainer(Head(seed=1), eval_every=EVAL_EVERY, max_steps=MAX_STEPS, **kwargs)
    default.fit(train, val)
    at_epoch = _trainer(Head(seed=1), eval_every=4, **kwargs).fit(train, val)
    for other in (default, at_epoch):
        pd.testing.assert_frame_equal(_history(plain), _history(other))
        assert other.best_epoch_ == plain.best_epoch_
    assert plain.history_["step"].tolist() == [4 * e for e in plain.history_["epoch"]]


# --------------------------------------------------------------- cheap per-period validation


def test_monitor_metrics_equal_scikit_learns():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, k = int(rng.integers(1, 200)), int(rng.integers(2, 12))
        y = rng.integers(-1, k, n)
        if rng.random() < 0.3:  # classes absent from the true labels
            y = np.minimum(y, 1)
        p = rng.random((n, k)) ** rng.uniform(0.1, 6)
        fast, full = monitor_metrics(y, p), classification_metrics(y, p)
        assert fast["accuracy"] == full["accuracy"]
        assert fast["macro_f1"] == full["macro_f1"]
        assert fast["n_cells"] == full["n_cells"]
        labelled = y >= 0
        if labelled.any():
            pred = p[labelled].argmax(axis=1)
            macro = skm.f1_score(y[labelled], pred, average="macro", zero_division=0)
            assert fast["macro_f1"] == macro
    assert monitor_metrics(np.array([-1, -1]), np.ones((2, 3)))["macro_f1"] is None
    with pytest.raises(ValueError, match="only 2 classes"):
        monitor_metrics(np.array([0, 2]), np.ones((2, 2)))


def _previous_validate(trainer: Trainer):
    """The validation the Trainer ran every epoch before: the full scikit-learn metrics."""

    def validate(val):
        metrics = trainer._evaluate(val, show=False, keys=("logits",))
        return {
            "val_loss": metrics["loss"],
            "val_accuracy": metrics["accuracy"],
            "val_macro_f1": metrics["macro_f1"],
        }

    return validate


@pytest.mark.parametrize("monitor", ["val_loss", "val_macro_f1"])
def test_history_and_selected_epoch_equal_the_previous_computation(monitor):
    train, val = NoBatches(200, seed=0), NoBatches(60, seed=1)
    kwargs = {"epochs": 12, "early_stopping_patience": 4, "monitor": monitor, "lr": 3e-2}
    before = _trainer(Head(seed=2), **kwargs)
    before._validate = _previous_validate(before)
    before.fit(train, val)
    now = _trainer(Head(seed=2), **kwargs).fit(Features(200, seed=0), Features(60, seed=1))
    pd.testing.assert_frame_equal(_history(before), _history(now), check_exact=True)
    assert now.best_epoch_ == before.best_epoch_
    for key, value in now.model.state_dict().items():
        assert torch.equal(value, before.model.state_dict()[key])


def test_validation_runs_without_scikit_learn(monkeypatch):
    def refuse(*args, **kwargs):
        msg = "the full metrics ran during training"
        raise AssertionError(msg)

    for name in ("accuracy_score", "f1_score", "balanced_accuracy_score", "roc_auc_score"):
        monkeypatch.setattr(skm, name, refuse)
    trainer = _trainer().fit(Features(64, seed=0), Features(32, seed=1))
    assert trainer.history_[["val_loss", "val_accuracy", "val_macro_f1"]].notna().all().all()


def test_in_memory_features_skip_the_data_loader(monkeypatch):
    import scdlkit.training._batching as batching

    data = Features(50, seed=0)
    items = [data[i] for i in (7, 3, 41)]
    batch = data.get_batch([7, 3, 41])
    assert torch.equal(batch["features"], torch.stack([it["features"] for it in items]))
    assert batch["labels"].tolist() == [it["labels"] for it in items]
    assert batch["labels"].dtype == torch.int64

    def refuse(*args, **kwargs):
        msg = "a DataLoader was built for in-memory features"
        raise AssertionError(msg)

    monkeypatch.setattr(batching, "make_loader", refuse)
    trainer = _trainer(epochs=2).fit(data, Features(20, seed=1))
    out = trainer.predict(Features(20, seed=1))
    assert out["logits"].shape == (20, C)


# ----------------------------------------------------------------------- the cost table


def _load_benchmark():
    path = ROOT / "benchmarks" / "step_budget.py"
    spec = importlib.util.spec_from_file_location("step_budget_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_step_budget_benchmark_prints_the_cost_table(capsys):
    bench = _load_benchmark()
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 700", "| 10,000", "| 100,000", "| 1,000,000"]
    plans = {n: bench.plan("lora", n) for n in bench.CELLS}
    small, mid, large = plans[700], plans[100_000], plans[1_000_000]
    assert small.bound == "floor"
    assert small.steps >= MIN_STEPS
    assert small.epochs == -(-MIN_STEPS // small.steps_per_epoch) > 10  # stretched
    assert mid.bound == "epochs"
    assert mid.steps == 10 * mid.steps_per_epoch
    assert mid.train_passes == 10 * mid.fit
    assert mid.eval_passes == 10 * mid.inner
    assert large.bound == "cap"
    assert large.steps == MAX_STEPS
    assert large.evaluations == 10
    assert large.eval_passes == 10 * large.inner
    assert large.train_passes == 2 * large.fit + (MAX_STEPS - 2 * large.steps_per_epoch) * 64
    assert "| 1,000,000 | 510,000 / 90,000 | 7,969 | 20,000 | 2.51 (3 begun) | cap |" in out
    hours = bench.table([large], train_rate=1.0, eval_rate=1.0)[-1]
    total = (large.train_passes + large.eval_passes) / 3600
    assert hours.endswith(f"| {total:,.1f} |")


class ThreadProbe(Head):
    """Records torch's intra-op threads at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def forward(self, batch):
        self.seen.add(torch.get_num_threads())
        return super().forward(batch)


def test_num_threads_applies_while_training_and_is_restored():
    before = torch.get_num_threads()
    model = ThreadProbe()
    trainer = _trainer(model, epochs=2, num_threads=1).fit(
        Features(32, seed=0), Features(16, seed=1)
    )
    trainer.predict(Features(16, seed=2))
    assert model.seen == {1}
    assert torch.get_num_threads() == before
    model.seen.clear()
    _trainer(model, epochs=1).fit(Features(32, seed=0))
    assert model.seen == {before}  # None leaves torch's setting
    with pytest.raises(ValueError, match="num_threads must be at least 1"):
        _trainer(num_threads=0)


def test_the_head_strategy_trains_on_one_thread(pbmc_raw, monkeypatch):
    calls = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), original(n))[1])
    before = torch.get_num_threads()
    sck.AnnotationRunner(
        label_key="bulk_labels",
        checkpoint=CHECKPOINT,
        strategies=("head",),
        training={"head": {"epochs": 2}},
        device="cpu",
        precision="fp32",
        progress=False,
    ).fit(pbmc_raw[:200].copy())
    assert 1 in calls
    assert calls[-1] == before
    assert torch.get_num_threads() == before


def test_keep_last_keeps_the_weights_of_the_last_step():
    # 5 steps of 4 per epoch, evaluated every epoch: without validation data "best" restores the
    # period with the lowest training loss, which need not be the last (a short one here)
    kwargs = {"epochs": 10, "max_steps": 5, "lr": 0.5, "seed": 0}
    best = _trainer(Head(seed=2), **kwargs).fit(Features(64, seed=0))
    last = _trainer(Head(seed=2), keep="last", **kwargs).fit(Features(64, seed=0))
    assert last.best_step_ == 5 == int(last.history_["step"].max())
    assert best.best_step_ == 4  # the case keep="last" exists for
    # the weights after step 5, however often the run was evaluated on the way
    every_step = _trainer(Head(seed=2), keep="last", eval_every=1, **kwargs)
    every_step.fit(Features(64, seed=0))
    assert every_step.history_["step"].tolist() == [1, 2, 3, 4, 5]
    for a, b in zip(last.model.parameters(), every_step.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(best.model.parameters(), last.model.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="keep"):
        _trainer(keep="first")
