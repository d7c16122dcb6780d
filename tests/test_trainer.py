from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from scdlkit.training import Trainer, resolve_precision
from scdlkit.training.metrics import json_safe

N_FEATURES = 8
N_CLASSES = 3


class ToyData(torch.utils.data.Dataset):
    """Three well separated Gaussian clusters; ``labels`` follows the dataset protocol."""

    def __init__(self, n: int = 240, *, seed: int = 0, classes: tuple[int, ...] = (0, 1, 2)):
        rng = np.random.default_rng(seed)
        self.labels = np.asarray(classes)[np.arange(n) % len(classes)].astype(np.int64)
        centres = 4.0 * np.eye(N_CLASSES, N_FEATURES)
        noise = rng.normal(size=(n, N_FEATURES))
        self.x = (centres[self.labels] + noise).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"x": self.x[i], "labels": int(self.labels[i]), "index": i}


class ReorderingData(ToyData):
    """Forms its own batches in a scrambled (but complete) order."""

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, epoch: int):
        order = np.random.default_rng(seed + 1000 * epoch + 7).permutation(len(self))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class CollatingData(ToyData):
    """Uses its own collate_fn, which the Trainer must pick up."""

    calls = 0

    def collate_fn(self, items):
        CollatingData.calls += 1
        return {
            "x": torch.from_numpy(np.stack([it["x"] for it in items])),
            "labels": torch.tensor([it["labels"] for it in items]),
        }


class MLP(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES, *, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU())
        self.head = nn.Linear(16, n_classes)

    def forward(self, batch):
        latent = self.encoder(batch["x"])
        return {"logits": self.head(latent), "latent": latent}


class AutoEncoder(nn.Module):
    def __init__(self, *, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(N_FEATURES, 2)
        self.decoder = nn.Linear(2, N_FEATURES)

    def forward(self, batch):
        latent = self.encoder(batch["x"])
        reconstruction = self.decoder(latent)
        loss = ((reconstruction - batch["x"]) ** 2).mean()
        return {"loss": loss, "latent": latent, "reconstruction": reconstruction}


def _trainer(model: nn.Module | None = None, **kwargs) -> Trainer:
    defaults = {"batch_size": 32, "epochs": 8, "lr": 1e-2, "progress": False, "accelerator": "cpu"}
    defaults["precision"] = "fp32"  # exact comparisons; precision="auto" is tested on its own
    return Trainer(model if model is not None else MLP(), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def fitted() -> tuple[Trainer, ToyData, ToyData]:
    train, val = ToyData(seed=0), ToyData(120, seed=1)
    return _trainer().fit(train, val), train, val


def test_fit_learns_and_records_history(fitted):
    trainer, _, val = fitted
    history = trainer.history_
    assert list(history.columns) == [
        "epoch",
        "step",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "lr",
        "seconds",
    ]
    assert history["epoch"].tolist() == list(range(1, 9))
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert history[["train_loss", "val_loss", "val_accuracy", "val_macro_f1"]].notna().all().all()
    metrics = trainer.evaluate(val)
    assert metrics["accuracy"] > 0.95
    assert metrics["n_cells"] == len(val)
    assert np.isfinite(metrics["loss"])
    assert trainer.trainable_parameters_ == sum(p.numel() for p in trainer.model.parameters())


def test_best_epoch_weights_are_restored():
    train, val = ToyData(seed=0), ToyData(120, seed=1)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Recording(Trainer):
        def _validate(self, val_data):
            row = super()._validate(val_data)
            epoch = len(snapshots) + 1
            snapshots[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}
            # make a late epoch look worse so the best epoch is not the last one
            if epoch > 3:
                row["val_loss"] = 10.0 + epoch
            return row

    trainer = Recording(MLP(), batch_size=32, epochs=6, lr=1e-2, progress=False).fit(train, val)
    best = int(trainer.history_["val_loss"].idxmin()) + 1
    assert trainer.best_epoch_ == best == 3
    restored = trainer.model.state_dict()
    for key, value in snapshots[best].items():
        torch.testing.assert_close(restored[key], value)
    assert not torch.equal(restored["head.weight"], snapshots[6]["head.weight"])


def test_early_stopping_stops_early():
    train, val = ToyData(seed=0), ToyData(120, seed=1)
    trainer = _trainer(epochs=50, lr=0.5, early_stopping_patience=2, grad_clip=None)
    trainer.fit(train, val)
    n = len(trainer.history_)
    assert n < 50
    # the last `patience` epochs did not beat the restored best epoch
    assert trainer.best_epoch_ == n - 2


def test_monitor_val_macro_f1_and_no_validation():
    train, val = ToyData(seed=0), ToyData(120, seed=1)
    trainer = _trainer(monitor="val_macro_f1", epochs=4).fit(train, val)
    best = trainer.history_["val_macro_f1"].max()
    assert trainer.history_.loc[trainer.best_epoch_ - 1, "val_macro_f1"] == best

    no_val = _trainer(epochs=4).fit(train)
    assert no_val.history_["val_loss"].isna().all()
    assert no_val.best_epoch_ == int(no_val.history_["train_loss"].idxmin()) + 1


def test_class_weight_balanced():
    # heavily imbalanced: class 0 dominates
    train = ToyData(300, seed=0)
    keep = np.r_[np.flatnonzero(train.labels == 0), np.flatnonzero(train.labels != 0)[:20]]
    train.labels, train.x = train.labels[keep], train.x[keep]
    trainer = _trainer(class_weight="balanced", epochs=10).fit(train)
    counts = np.bincount(train.labels, minlength=N_CLASSES)
    expected = counts.sum() / (N_CLASSES * counts)
    np.testing.assert_allclose(trainer._class_weights.numpy(), expected, rtol=1e-6)
    assert trainer.evaluate(ToyData(120, seed=1))["balanced_accuracy"] > 0.9


def test_predict_rows_in_dataset_order(fitted):
    trainer, _, val = fitted
    out = trainer.predict(val)
    assert set(out) == {"logits", "probabilities", "latent", "label_codes"}
    assert out["logits"].shape == (len(val), N_CLASSES)
    assert out["logits"].dtype == np.float32
    assert out["latent"].shape == (len(val), 16)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["label_codes"], out["logits"].argmax(axis=1))
    with torch.inference_mode():
        direct = trainer.model({"x": torch.from_numpy(val.x)})["logits"].numpy()
    np.testing.assert_allclose(out["logits"], direct, rtol=1e-5, atol=1e-6)

    reordering = ReorderingData(120, seed=1)
    np.testing.assert_allclose(trainer.predict(reordering)["logits"], direct, rtol=1e-5, atol=1e-6)


def test_dataset_batches_and_collate_fn_are_used():
    train = ReorderingData(seed=0)
    trainer = _trainer(epochs=3).fit(train)
    assert trainer.evaluate(ToyData(120, seed=1))["accuracy"] > 0.9

    CollatingData.calls = 0
    data = CollatingData(64, seed=1)
    out = trainer.predict(data)
    assert CollatingData.calls == 2  # 64 cells in batches of 32
    assert out["logits"].shape == (64, N_CLASSES)


def test_incomplete_batches_are_an_error():
    class Dropping(ToyData):
        def batches(self, batch_size, *, shuffle, seed, epoch):
            return [range(0, 10)]

    trainer = _trainer(epochs=1)
    with pytest.raises(ValueError, match="exactly once"):
        trainer.predict(Dropping(40))


def test_evaluate_auroc_finite_with_absent_class(fitted):
    trainer, _, _ = fitted
    # the evaluated split holds only classes 0 and 2; class 1 is absent
    split = ToyData(90, seed=3, classes=(0, 2))
    metrics = trainer.evaluate(split)
    assert metrics["auroc_ovr"] is not None
    assert np.isfinite(metrics["auroc_ovr"])
    assert metrics["auroc_ovr"] > 0.95
    json.dumps(json_safe(metrics), allow_nan=False)


def test_unlabelled_cells_are_ignored():
    train = ToyData(seed=0)
    train.labels = train.labels.copy()
    train.labels[::4] = -1
    # scramble the features of the unlabelled cells: if they were used, they would hurt
    rng = np.random.default_rng(0)
    train.x[::4] = rng.normal(scale=5.0, size=train.x[::4].shape).astype(np.float32)
    trainer = _trainer(epochs=8).fit(train)
    assert np.isfinite(trainer.history_["train_loss"]).all()

    val = ToyData(120, seed=1)
    full = trainer.evaluate(val)
    val.labels = val.labels.copy()
    val.labels[:60] = -1
    part = trainer.evaluate(val)
    assert part["n_cells"] == 60
    assert full["n_cells"] == 120
    assert part["accuracy"] > 0.9

    val.labels[:] = -1
    empty = trainer.evaluate(val)
    assert empty["n_cells"] == 0
    assert empty["accuracy"] is None
    assert empty["loss"] is None


def test_all_unlabelled_batch_gives_zero_loss_not_nan():
    train = ToyData(64, seed=0)
    train.labels = train.labels.copy()
    train.labels[:32] = -1  # the first sequential batch has no labels
    trainer = _trainer(epochs=1)
    trainer._ready()
    batch = {"x": torch.from_numpy(train.x[:32]), "labels": torch.from_numpy(train.labels[:32])}
    loss, _, denominator = trainer._loss(trainer.model(batch), batch, 32)
    assert loss.item() == 0.0
    assert denominator.item() == 0.0
    loss.backward()  # still differentiable


def test_representation_task_trains_on_model_loss():
    train, val = ToyData(seed=0), ToyData(120, seed=1)
    trainer = _trainer(AutoEncoder(), task="representation", epochs=10).fit(train, val)
    history = trainer.history_
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_accuracy"].isna().all()
    out = trainer.predict(val)
    assert set(out) == {"latent", "reconstruction"}
    assert out["latent"].shape == (len(val), 2)
    assert out["reconstruction"].shape == (len(val), N_FEATURES)
    expected = ((out["reconstruction"] - val.x) ** 2).mean()
    np.testing.assert_allclose(trainer.evaluate(val)["loss"], expected, rtol=1e-4)


def test_representation_needs_model_loss():
    with pytest.raises(ValueError, match="scalar 'loss'"):
        _trainer(MLP(), task="representation", epochs=1).fit(ToyData(64))


def test_seed_makes_fits_identical():
    def run() -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
        trainer = _trainer(MLP(seed=3), epochs=3, seed=11, warmup=0.2, lr_decay=0.9)
        trainer.fit(ToyData(seed=0), ToyData(120, seed=1))
        return trainer.history_.drop(columns="seconds"), trainer.model.state_dict()

    (h1, w1), (h2, w2) = run(), run()
    pd.testing.assert_frame_equal(h1, h2)
    for key in w1:
        assert torch.equal(w1[key], w2[key])


def test_warmup_and_lr_decay_schedule():
    trainer = _trainer(epochs=3, warmup=4, lr_decay=0.5, lr=0.1).fit(ToyData(64))
    # 2 steps per epoch: the warm-up reaches the peak at step 4 (epoch 2), then decays
    np.testing.assert_allclose(trainer.history_["lr"], [0.1 * 2 / 4, 0.1 * 0.5, 0.1 * 0.25])
    from scdlkit.training._schedule import lr_factor

    assert 0.1 * lr_factor(0, 0, 4, 0.5) == pytest.approx(0.025)


class MLPWithHead(MLP):
    def head_parameters(self):
        return list(self.head.parameters())


def test_head_lr_trains_the_head_at_its_own_rate():
    from scdlkit.training._schedule import build_optimizer

    model = MLPWithHead()
    optimizer = build_optimizer(
        model, model, optimizer="adamw", lr=1e-4, head_lr=1e-2, weight_decay=0.0, eps=1e-8
    )
    rates = [(g["lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups]
    assert rates == [(1e-4, N_FEATURES * 16 + 16), (1e-2, 16 * N_CLASSES + N_CLASSES)]
    # one schedule scales both: after fitting with decay, the ratio of the rates is unchanged
    trainer = _trainer(MLPWithHead(), epochs=2, lr=1e-3, head_lr=1e-2, lr_decay=0.5)
    trainer.fit(ToyData(64))
    np.testing.assert_allclose(trainer.history_["lr"], [1e-3, 5e-4])
    # Adam's first step moves every weight by about its rate: the head ten times the encoder
    model = MLPWithHead()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(model, epochs=1, lr=1e-4, head_lr=1e-3, grad_clip=None).fit(ToyData(16))
    moved = {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()}
    assert moved["head.weight"] > 5 * moved["encoder.0.weight"]


def test_head_lr_needs_a_model_that_names_its_head():
    with pytest.raises(ValueError, match="head_parameters"):
        _trainer(MLP(), epochs=1, head_lr=1e-2).fit(ToyData(16))


def test_frozen_parameters_are_not_trained():
    model = MLP()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainer = _trainer(model, epochs=2, weight_decay=0.1).fit(ToyData(64))
    assert trainer.trainable_parameters_ == 16 * N_CLASSES + N_CLASSES
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key])


def test_precision_auto_on_cpu_follows_native_bf16(monkeypatch):
    from scdlkit._shared import hardware as _hardware

    monkeypatch.delenv(_hardware.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx2"}))
    trainer = _trainer(precision="auto")
    assert trainer.precision == "32-true"
    assert trainer.fabric.strategy.precision.precision == "32-true"
    assert Trainer(MLP(), progress=False).precision == "32-true"
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert Trainer(MLP(), accelerator="cpu", progress=False).precision == "bf16-mixed"


def test_resolve_precision(monkeypatch):
    from scdlkit._shared import hardware as _hardware

    monkeypatch.delenv(_hardware.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_: True)
    assert resolve_precision("auto") == "bf16-mixed"
    assert resolve_precision("auto", accelerator="cuda") == "bf16-mixed"
    assert resolve_precision("auto", accelerator="gpu") == "bf16-mixed"
    assert resolve_precision("auto", accelerator="cpu") == "32-true"
    assert resolve_precision("auto", accelerator="mps") == "32-true"
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert resolve_precision("auto", accelerator="cpu") == "bf16-mixed"
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_: False)
    assert resolve_precision("auto") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "32-true"
    assert resolve_precision("fp32") == "32-true"
    assert resolve_precision("bf16") == "bf16-mixed"
    assert resolve_precision("16-mixed") == "16-mixed"


@pytest.mark.parametrize(
    ("optimizer", "reference_class"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
@pytest.mark.parametrize("adam_eps", [1e-8, 1e-1])
def test_optimizer_and_adam_eps_match_torch(optimizer, reference_class, adam_eps):
    data = ToyData(32)
    batch = {"x": torch.from_numpy(data.x), "labels": torch.from_numpy(data.labels)}
    settings = {"lr": 0.05, "weight_decay": 0.1}
    reference = MLP(seed=5)
    step = reference_class(reference.parameters(), eps=adam_eps, **settings)
    nn.functional.cross_entropy(reference(batch)["logits"], batch["labels"]).backward()
    step.step()
    trainer = _trainer(
        MLP(seed=5), optimizer=optimizer, adam_eps=adam_eps, epochs=1, grad_clip=None, **settings
    ).fit(data)  # one batch of all 32 cells: exactly one optimiser step
    fitted = trainer.model.state_dict()
    for key, expected in reference.state_dict().items():
        torch.testing.assert_close(fitted[key], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        _trainer(optimizer="sgd")
    with pytest.raises(ValueError, match="adam_eps"):
        _trainer(adam_eps=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "regression"}, "task"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"warmup": 1.5}, "warmup"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"monitor": "val_auroc"}, "monitor"),
        ({"class_weight": "auto"}, "class_weight"),
        ({"task": "representation", "monitor": "val_macro_f1"}, "monitor"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(**kwargs)


def test_labels_beyond_the_logits_are_an_error():
    data = ToyData(64)
    data.labels = data.labels.copy()
    data.labels[0] = 5
    with pytest.raises(ValueError, match="code 5"):
        _trainer(epochs=1).fit(data)


def test_no_trainable_parameters_is_an_error():
    model = MLP()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        _trainer(model).fit(ToyData(64))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path: Path):
    # Fabric's "ddp" launcher re-runs the script for rank 1; gloo on two CPU processes.
    script = Path(__file__).with_name("_ddp_script.py")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "ddp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard only; the run takes seconds on an idle machine
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(results) == 2
    for result in results:
        assert result["world_size"] == 2
        assert result["accuracy"] > 0.9
        assert result["n_predicted"] == result["n_cells"]
        assert result["predictions_in_order"]
    assert len({r["weights_digest"] for r in results}) == 1
