"""Issue 23, finding 5: hostile arguments are refused before any work, with one clear line.

Each test names what the issue found on e687719: a typo in ``class_weight`` or a negative
``head_lr`` failed only inside a strategy's fit (after tokenising, features and other fits);
``--attention-dropout 1.5`` ran unchecked; ``--lr 1e30`` ended in a traceback (exit 1) and a
diverging Trainer left a NaN model; ``n_repeats=np.int64(2)`` was refused. Every failing call is
wrapped in a check that the AnnData (or the input file) is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from anndata.tests.helpers import assert_equal
from torch import nn

import scdlkit as sck
from scdlkit import cli
from scdlkit._shared.strategies import STRATEGIES
from scdlkit.cli import main

LABEL = "bulk_labels"
FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def small_ref(_pbmc_raw):
    """90 cells of the three largest classes, 200 genes: a fit takes about a second."""
    labels = _pbmc_raw.obs[LABEL]
    cells = np.flatnonzero(labels.isin(labels.value_counts().index[:3]))
    rng = np.random.default_rng(0)
    return _pbmc_raw[np.sort(rng.choice(cells, 90, replace=False)), :200].copy()


@pytest.fixture
def no_work(monkeypatch):
    """Any piece of model work (tokenising, reading weights, encoding) fails the test."""
    import scdlkit.foundation._runner as runner_module

    def refuse(*args, **kwargs):
        msg = "model work started before the arguments were checked"
        raise AssertionError(msg)

    from scdlkit.foundation.models.scgpt import _card as scgpt_card

    for name in ("prepare_preflighted", "encode_cells", "encode_adata"):
        monkeypatch.setattr(runner_module, name, refuse)
    monkeypatch.setattr(scgpt_card, "load_state_dict_file", refuse)  # the card reads weights


@contextlib.contextmanager
def unchanged(adata: ad.AnnData) -> Iterator[None]:
    """The AnnData is exactly as it was once the block ends (also when it raised)."""
    before = adata.copy()
    try:
        yield
    finally:
        assert_equal(adata, before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scdlkit: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _adapt(adata, checkpoint_dir, **kwargs):
    return sck.adapt_annotation(
        adata, label_key=LABEL, checkpoint=checkpoint_dir, **{**FAST, **kwargs}
    )


# -------------------------------------------------- a class_weight typo: refused before any work


@pytest.mark.parametrize(
    "kwargs",
    [
        {"class_weight": "balancd"},
        {"training": {"class_weight": "balancd"}},
        {"training": {"head": {"class_weight": "balancd"}}},
        {"training": {"frozen_probe": {"class_weight": "balancd"}}},
    ],
)
def test_a_class_weight_typo_is_refused_before_any_work(small_ref, checkpoint_dir, no_work, kwargs):
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"class_weight.*'balancd'.*'balanced'"):
        _adapt(adata, checkpoint_dir, strategies=("frozen_probe", "head"), **kwargs)
    with unchanged(adata), pytest.raises(ValueError, match="class_weight"):
        sck.tl.adapt_annotation(
            adata, LABEL, checkpoint=checkpoint_dir, strategies=("frozen_probe", "head"), **kwargs
        )


# ------------------------------------- a negative head_lr (any bad setting): refused before work


@pytest.mark.parametrize(
    ("training", "named"),
    [
        ({"head_lr": -1e-3}, "training['head_lr'] must be greater than 0"),
        ({"lr": float("nan")}, "training['lr'] must be a finite number"),
        ({"head": {"lr": 0}}, "training['head']['lr'] must be greater than 0"),
        ({"lora": {"epochs": 0}}, "training['lora']['epochs'] must be at least 1"),
        ({"warmup": 1.5}, "training['warmup']=1.5"),
        ({"encoder_dropout": 1.0}, "training['encoder_dropout'] must be less than 1"),
        ({"lr_decay": 2}, "training['lr_decay'] must be at most 1"),
        ({"early_stopping_patience": 2.5}, "training['early_stopping_patience'] must be a whole"),
        (
            {"optimizer": "sgd"},
            "training['optimizer']='sgd' is not one of 'adamw', 'adam', 'adafactor'",
        ),
        ({"head_lrr": 1e-3}, "unknown setting(s) 'head_lrr'; allowed: the settings"),
        ({"head": {"encoder_dropout": 0.1}}, "training['head'] has unknown setting"),
        ({"head": 1e-3}, "training['head'] must be a dict"),
    ],
)
def test_a_bad_training_setting_is_refused_before_any_work(
    small_ref, checkpoint_dir, no_work, training, named
):
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises((TypeError, ValueError), match=re.escape(named)):
        _adapt(adata, checkpoint_dir, strategies=("frozen_probe", "head"), training=training)


def test_the_refusal_names_the_allowed_settings(small_ref, checkpoint_dir, no_work):
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match="'learning_rate'") as err:
        _adapt(adata, checkpoint_dir, training={"learning_rate": 1e-3})
    for allowed in ("'lr'", "'head_lr'", "'epochs'", "'warmup'", "'encoder_dropout'"):
        assert allowed in str(err.value)
    assert ", ".join(STRATEGIES) in str(err.value)  # or a strategy name mapping to settings


# ------------------------------------------ attention_dropout out of range: refused before work


def test_attention_dropout_out_of_range_is_refused_before_any_work(
    small_ref, checkpoint_dir, no_work
):
    adata = small_ref.copy()
    for bad in (1.5, 1.0, -0.1, float("inf")):
        with unchanged(adata), pytest.raises(ValueError, match="attention_dropout"):
            _adapt(
                adata, checkpoint_dir, strategies=("frozen_probe", "head"), attention_dropout=bad
            )


@pytest.fixture
def input_never_read(monkeypatch):
    def read_input(*args, **kwargs):
        msg = "the input was read before the options were checked"
        raise AssertionError(msg)

    monkeypatch.setattr(cli._commands, "read_input", read_input)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--attention-dropout", "1.5"),
        ("--attention-dropout", "nan"),
        ("--confidence-threshold", "1.5"),
        ("--lr", "-1"),
        ("--lr", "inf"),
        ("--random-state", "-1"),
        ("--random-state", str(2**32)),
        ("--val-size", "0.6 --test-size 0.5"),  # each in range, together no training cells
    ],
)
def test_the_cli_refuses_bad_options_in_one_line_before_reading_input(
    tmp_path, input_never_read, option, value
):
    out = tmp_path / "out.h5ad"
    argv = ["adapt", tmp_path / "ref.h5ad", "--label-key", LABEL, "-o", out, option, *value.split()]
    code, err = _run(argv)
    assert code == 2
    line = _one_line(err)
    assert option in line or option.lstrip("-").replace("-", "_") in line
    assert not out.exists()


# ------------------------------------------- a diverging run: one ValueError naming the rates


def test_a_diverging_cli_run_exits_2_with_one_line_naming_the_learning_rate(
    small_ref, checkpoint_dir, tmp_path
):
    ref = tmp_path / "ref.h5ad"
    small_ref.write_h5ad(ref)
    digest = _sha(ref)
    out = tmp_path / "out.h5ad"
    argv = [
        "adapt", ref, "--label-key", LABEL, "-o", out, "--checkpoint", checkpoint_dir,
        "--strategies", "head", "--epochs", "2", "--batch-size", "16", "--lr", "1e30",
        "--precision", "fp32",
    ]  # fmt: skip
    code, err = _run(argv)
    assert code == 2, err
    line = _one_line(err)
    assert "diverged" in line
    assert "lr=1e+30" in line
    assert "smaller learning rate" in line
    assert "--lr" in line
    assert not out.exists()
    assert _sha(ref) == digest


def test_a_diverging_adapt_is_a_value_error_and_leaves_the_anndata_unchanged(
    small_ref, checkpoint_dir
):
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"'head'.*diverged.*lr=1e\+30"):
        _adapt(adata, checkpoint_dir, strategies=("head",), lr=1e30, batch_size=16, epochs=2)


class _Toy(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = np.arange(64) % 2
        self.x = torch.randn(64, 4, generator=g) + 3 * torch.as_tensor(self.labels)[:, None]

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": int(self.labels[i])}


class _Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 2))

    def forward(self, batch: dict) -> dict:
        return {"logits": self.net(batch["x"])}

    def head_parameters(self):
        return self.net[-1].parameters()


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_a_diverging_trainer_raises_instead_of_keeping_a_nan_model(grad_clip):
    trainer = sck.Trainer(
        _Deep(), batch_size=8, epochs=3, lr=1e30, grad_clip=grad_clip, progress=False
    )
    with pytest.raises(ValueError, match=r"diverged.*lr=1e\+30.*smaller learning rate"):
        trainer.fit(_Toy())
    with pytest.raises(sck.training.TrainingDivergedError, match=r"head_lr=0\.5"):
        sck.Trainer(_Deep(), lr=1e30, head_lr=0.5, grad_clip=grad_clip, progress=False)._fit(
            _Toy(), None
        )


def test_a_sane_learning_rate_still_trains(tmp_path):
    trainer = sck.Trainer(_Deep(), batch_size=8, epochs=3, lr=1e-2, progress=False).fit(_Toy())
    assert np.isfinite(trainer.history_["train_loss"]).all()


# ---------------------------------------------------------- numpy integers where ints are taken


def test_numpy_integers_are_accepted_and_recorded_as_ints(small_ref, checkpoint_dir):
    adata = small_ref.copy()
    with unchanged(adata):
        runner = _adapt(
            adata,
            checkpoint_dir,
            strategies=("baseline",),
            n_repeats=np.int64(2),
            random_state=np.int32(3),
            batch_size=np.int64(32),
            epochs=np.int64(1),
            val_size=np.float32(0.25),
        )
    assert runner.n_repeats == 2
    assert type(runner.n_repeats) is int
    assert type(runner.random_state) is int
    assert len(runner.repeat_metrics_) == 2
    params = runner.params()
    assert (params["n_repeats"], params["random_state"], params["batch_size"]) == (2, 3, 32)
    json.dumps(params)  # numpy scalars would not serialise
    trainer = sck.Trainer(_Deep(), epochs=np.int64(1), seed=np.uint32(5), progress=False)
    assert (type(trainer.epochs), type(trainer.seed)) == (int, int)


# ------------------------------------------------------------- the other entry points, as well


def test_every_runner_method_checks_its_arguments_before_work(small_ref, checkpoint_dir, no_work):
    runner = sck.AnnotationRunner(label_key=LABEL, checkpoint=checkpoint_dir)
    runner._fitted = True  # anything past the checks would need a real fit
    adata = small_ref.copy()
    with unchanged(adata):
        with pytest.raises(ValueError, match="chunk_size must be at least 1"):
            runner.predict(adata, chunk_size=0)
        with pytest.raises(TypeError, match="gene_key must be a string"):
            runner.predict(adata, gene_key=3)
        with pytest.raises(TypeError, match="adata must be an AnnData"):
            runner.predict(adata.to_df())
        with pytest.raises(ValueError, match="obs_key must not be an empty string"):
            runner.annotate_adata(adata, obs_key="")
        with pytest.raises(ValueError, match=r"predictions lacks \['latent'\]"):
            runner.annotate_adata(
                adata, predictions={"label_codes": 0, "labels": 0, "probabilities": 0}
            )
        with pytest.raises(TypeError, match="adata must be an AnnData"):
            sck.AnnotationRunner(label_key=LABEL, checkpoint=checkpoint_dir).fit(adata.X)
    with pytest.raises(TypeError, match="verify_checkpoint must be True or False"):
        sck.AnnotationRunner.load("somewhere", verify_checkpoint="yes")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        sck.AnnotationRunner.load("somewhere", device="gpu")


def test_annotate_adata_with_predictions_of_another_anndata_writes_nothing(
    small_ref, checkpoint_dir
):
    runner = _adapt(small_ref.copy(), checkpoint_dir, strategies=("baseline",))
    adata = small_ref[:40].copy()
    other = runner.predict(small_ref[:30].copy())
    with unchanged(adata), pytest.raises(ValueError, match="30 rows for an AnnData of 40 cells"):
        runner.annotate_adata(adata, predictions=other)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"val_size": 0.0}, ValueError, r"no validation cells \(val_size=0.0\) to rank \d"),
        ({"random_state": 2**32 - 1, "n_repeats": 2}, ValueError, "beyond the largest seed"),
        ({"test_batches": "donor1", "val_batches": [1.5]}, TypeError, "val_batches must hold"),
        ({"strategies": 5}, TypeError, "strategies must be strategy names"),
        ({"strategy_configs": {"lora": 3}, "strategies": ("lora",)}, TypeError, "LoRAConfig"),
        ({"output_dir": 3}, TypeError, "output_dir must be a string"),
        ({"overwrite": "yes"}, TypeError, "overwrite must be True or False"),
        ({"progress": 1}, TypeError, "progress must be True or False"),
        ({"device": "cuda:x"}, ValueError, "device='cuda:x' is not a device"),
        ({"batch_size": 0}, ValueError, "batch_size must be at least 1"),
        ({"n_repeats": True}, TypeError, "n_repeats must be an integer"),
    ],
)
def test_runner_arguments_are_refused_before_any_work(
    small_ref, checkpoint_dir, no_work, kwargs, error, match
):
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(error, match=match):
        _adapt(adata, checkpoint_dir, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"hidden_dims": (64, 0)}, ValueError, r"hidden_dims\[1\] must be at least 1"),
        ({"dropout": 1.0}, ValueError, "dropout must be less than 1"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number"),
        ({"random_state": -1}, ValueError, "random_state must be at least 0"),
        ({"gene_key": 5}, TypeError, "gene_key must be a string"),
        ({"progress": "no"}, TypeError, "progress must be True or False"),
    ],
)
def test_task_runner_arguments_are_refused_before_any_work(pbmc_raw, kwargs, error, match):
    before = pbmc_raw.copy()
    with pytest.raises(error, match=match):
        sck.TaskRunner(model="mlp", label_key=LABEL, **kwargs).fit(pbmc_raw)
    assert_equal(pbmc_raw, before)
