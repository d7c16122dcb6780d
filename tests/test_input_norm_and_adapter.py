"""Issue 24 items 3-4: the classifier-input normalisation and scPEFT's adapter placement; the
tuning script of item 2 (its smoke run and its rule)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from anndata.tests.helpers import assert_equal
from torch import nn

from scdlkit.foundation._annotation_model import (
    INPUT_NORMS,
    BatchStandardiser,
    FeatureStandardiser,
    LayerNormInput,
    build_annotation_model,
    load_scgpt_annotation_model,
)
from scdlkit.foundation.models.scgpt._checkpoint import resolve_checkpoint
from scdlkit.foundation.models.scgpt._genes import tokenize_adata
from scdlkit.foundation.models.scgpt._loading import load_scgpt_model, load_state_dict_file
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens
from scdlkit.foundation.peft import (
    AdapterConfig,
    AdapterLayerNorm,
    AdapterLinear,
    apply_adapter,
    freeze_except_peft,
    peft_parameter_names,
)

D, N_LAYERS, N_CLASSES = 32, 2, 4  # the tiny fixture checkpoint
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import(name: str) -> ModuleType:
    module_name = f"scdlkit_benchmarks_{name.lstrip('_')}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir):
    return resolve_checkpoint(checkpoint_dir)


@pytest.fixture(scope="module")
def state(ckpt):
    return load_state_dict_file(ckpt.weights_path)


@pytest.fixture(scope="module")
def batch(checkpoint_dir, ckpt) -> dict[str, torch.Tensor]:
    import anndata as ad

    adata = ad.read_h5ad(checkpoint_dir.parent / "data.h5ad")
    tokens, _ = tokenize_adata(adata, ckpt)
    return collate_tokens(tokens, range(12))


def _build(state, ckpt, strategy="lora", **kwargs):
    return build_annotation_model(
        state, ckpt, num_classes=N_CLASSES, tuning_strategy=strategy, **kwargs
    )


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)["logits"]


def _hidden(encoder, batch) -> torch.Tensor:
    with torch.no_grad():
        return encoder(batch["gene_ids"], batch["values"], batch["padding_mask"])


def _perturb(module: nn.Module, names: list[str], scale: float = 0.5) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(torch.randn_like(params[name]) * scale)


# ------------------------------------------------------------------------ input normalisation


def test_input_norm_default_is_frozen_and_its_config_reads_as_before(state, ckpt):
    model = _build(state, ckpt)
    assert model.input_norm == "frozen"
    assert isinstance(model.feature_norm, FeatureStandardiser)
    # absent means "frozen": a manifest of a frozen model reads as before the option existed
    assert "input_norm" not in model.config_dict()
    assert set(INPUT_NORMS) == {"frozen", "layernorm", "batch", "none"}


@pytest.mark.parametrize(
    ("input_norm", "cls"),
    [("frozen", FeatureStandardiser), ("layernorm", LayerNormInput), ("batch", BatchStandardiser)],
)
def test_input_norm_builds_its_module(state, ckpt, input_norm, cls):
    model = _build(state, ckpt, input_norm=input_norm)
    assert type(model.feature_norm) is cls
    assert model.config_dict().get("input_norm", "frozen") == input_norm
    assert f"input_norm={input_norm!r}" in repr(model)
    rebuilt = build_annotation_model(state, model.encoder.checkpoint, **model.config_dict())
    assert type(rebuilt.feature_norm) is cls


def test_unknown_input_norm_is_refused_before_weights_are_read(state, ckpt, monkeypatch):
    from scdlkit.foundation import _annotation_model

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(_annotation_model, "load_encoder", never)
    monkeypatch.setattr(_annotation_model, "model_card", never)
    with pytest.raises(ValueError, match=r"input_norm='bogus' is not one of 'frozen'"):
        _build(state, ckpt, input_norm="bogus")
    with pytest.raises(ValueError, match=r"input_norm=None is not one of"):
        load_scgpt_annotation_model(N_CLASSES, checkpoint=ckpt, input_norm=None)


def test_load_scgpt_annotation_model_takes_input_norm(ckpt):
    model = load_scgpt_annotation_model(
        N_CLASSES, checkpoint=ckpt, tuning_strategy="ia3", input_norm="layernorm", device="cpu"
    )
    assert isinstance(model.feature_norm, LayerNormInput)


def test_layernorm_input_ignores_fit_and_trains_with_the_head(state, ckpt, batch):
    model = _build(state, ckpt, "ia3", input_norm="layernorm")
    norm = model.feature_norm
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    assert norm.fit(torch.randn(20, D) * 5 + 3) is norm  # nothing to fit
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key
    # trained with the head: counted, at the head's rate, and moved by a step
    head_ids = {id(p) for p in model.head_parameters()}
    assert {id(norm.weight), id(norm.bias)} <= head_ids
    assert norm.weight.requires_grad
    assert norm.bias.requires_grad
    frozen = _build(state, ckpt, "ia3")
    assert model.trainable_parameter_count() == frozen.trainable_parameter_count() + 2 * D
    optimiser = torch.optim.AdamW(model.head_parameters(), lr=1e-2)
    labels = torch.arange(12) % N_CLASSES
    nn.functional.cross_entropy(model.train()(batch)["logits"], labels).backward()
    optimiser.step()
    assert not torch.equal(norm.weight.detach(), before["weight"])


def test_layernorm_input_normalises_each_cell(state, ckpt):
    model = _build(state, ckpt, "head", input_norm="layernorm").eval()
    x = torch.randn(6, D) * 0.02 + torch.linspace(-1, 1, D)  # a large shared component
    out = model.feature_norm(x)
    torch.testing.assert_close(out.mean(1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_batch_input_norm_follows_the_encoder(state, ckpt):
    model = _build(state, ckpt, "ia3", input_norm="batch")
    norm = model.feature_norm
    assert not list(norm.parameters())  # statistics only
    frozen = torch.randn(200, D) * 0.02 + 1.0
    norm.fit(frozen)
    torch.testing.assert_close(norm.running_mean, frozen.mean(0))
    torch.testing.assert_close(norm.running_var, frozen.var(0))
    # training: each batch standardised with its own statistics, the estimates move towards them
    moved = torch.randn(64, D) * 0.5 - 2.0
    out = norm.train()(moved)
    torch.testing.assert_close(out.mean(0), torch.zeros(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(D), atol=1e-3, rtol=0)
    expected = 0.9 * frozen.mean(0) + 0.1 * moved.mean(0)
    torch.testing.assert_close(norm.running_mean, expected)
    for _ in range(60):  # 0.9**60 of the old estimate is left
        norm(torch.randn(64, D) * 0.5 - 2.0)
    assert float((norm.running_mean + 2.0).abs().max()) < 0.2
    assert float((norm.running_var.sqrt() - 0.5).abs().max()) < 0.1
    # evaluation reads the running estimates
    norm.eval()
    x = torch.randn(5, D)
    torch.testing.assert_close(
        norm(x), (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
    )
    # a training batch of one cell has no variance: it is standardised with the estimates
    norm.train()
    mean = norm.running_mean.clone()
    torch.testing.assert_close(norm(x[:1]), (x[:1] - mean) / torch.sqrt(norm.running_var + 1e-5))
    assert torch.equal(norm.running_mean, mean)


def test_batch_input_norm_works_without_fit(state, ckpt, batch):
    model = _build(state, ckpt, "ia3", input_norm="batch").train()
    labels = torch.arange(12) % N_CLASSES
    loss = nn.functional.cross_entropy(model(batch)["logits"], labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert not torch.equal(model.feature_norm.running_mean, torch.zeros(D))


@pytest.mark.parametrize("input_norm", INPUT_NORMS)
@pytest.mark.parametrize("strategy", ["head", "full_finetune", "ia3"])
def test_input_norm_round_trips_through_config_and_adaptation_state(
    state, ckpt, batch, strategy, input_norm
):
    model = _build(state, ckpt, strategy, input_norm=input_norm, seed=0)
    model.feature_norm.fit(torch.randn(30, D) * 0.1 + 0.3)
    _perturb(model, [n for n, p in model.named_parameters() if p.requires_grad], 0.1)
    saved = {k: v.clone() for k, v in model.adaptation_state_dict().items()}
    own = {k for k in model.state_dict() if k.startswith("feature_norm.")}
    assert bool(own) == (input_norm != "none")  # the raw vector has no state
    assert own <= set(saved)
    config = model.config_dict()
    fresh = build_annotation_model(state, ckpt, **config, seed=1)
    assert fresh.input_norm == input_norm
    assert not torch.allclose(_logits(fresh.eval(), batch), _logits(model.eval(), batch))
    fresh.load_adaptation_state_dict(saved)
    torch.testing.assert_close(_logits(fresh.eval(), batch), _logits(model.eval(), batch))


def test_a_config_saved_before_input_norm_rebuilds_frozen(state, ckpt, batch):
    model = _build(state, ckpt, "lora")
    model.feature_norm.fit(torch.randn(30, D) * 0.1)
    _perturb(model, [n for n, p in model.named_parameters() if p.requires_grad], 0.1)
    old_config = {k: v for k, v in model.config_dict().items() if k != "input_norm"}
    old_state = {k: v.clone() for k, v in model.adaptation_state_dict().items()}
    assert {"feature_norm.shift", "feature_norm.scale"} <= set(old_state)
    fresh = build_annotation_model(state, ckpt, **old_config)
    assert fresh.input_norm == "frozen"
    fresh.load_adaptation_state_dict(old_state)
    torch.testing.assert_close(_logits(fresh.eval(), batch), _logits(model.eval(), batch))
    # the state of one normalisation does not load into another
    other = build_annotation_model(state, ckpt, **old_config, input_norm="layernorm")
    with pytest.raises(ValueError, match="missing keys"):
        other.load_adaptation_state_dict(old_state)


def _fit_runner(planted, adata, input_norm, **kwargs):
    import scdlkit as sck

    training = {"ia3": {"epochs": 1}}
    with planted.classifier_input_norm(training, input_norm) as resolved:
        return sck.AnnotationRunner(
            label_key="cell_type",
            checkpoint=planted.RANDOM_CHECKPOINT,
            strategies=("ia3",),
            training=resolved,
            precision="fp32",
            progress=False,
            random_state=0,
            **kwargs,
        ).fit(adata)


def test_runner_fits_a_non_frozen_input_norm_and_its_family_rebuilds_it():
    """Through the runner (the benchmark helper sets input_norm) and back from the saved state
    and manifest fields of its strategy family."""
    import json

    from scdlkit.foundation._fitting import BaseWeights
    from scdlkit.foundation.strategies import strategy_family

    planted = _import("planted_signal")
    adata = planted.planted_signal_adata(n_cells=60)
    runner = _fit_runner(planted, adata, "batch")
    model = runner.results_["ia3"].model
    assert model.input_norm == "batch"
    # the running estimates moved from the frozen features' statistics while training
    train = runner.split_.indices("train")
    frozen_mean = torch.as_tensor(runner._features[train].mean(0))
    assert not torch.allclose(model.feature_norm.running_mean, frozen_mean, atol=1e-6)
    family = strategy_family("ia3")
    tensors = family.state(model)
    assert any(k.startswith("model.feature_norm.running_") for k in tensors)
    fields = json.loads(json.dumps(family.manifest_fields(model)))
    assert fields["model_config"]["input_norm"] == "batch"
    rebuilt = family.from_state("ia3", tensors, fields, BaseWeights(runner.checkpoint_))
    assert rebuilt.input_norm == "batch"
    from scdlkit.foundation.models.scgpt._tokenize import collate_tokens

    batch = collate_tokens(runner.prepared_.tokens, range(16))
    torch.testing.assert_close(_logits(rebuilt.eval(), batch), _logits(model.eval(), batch))


def test_a_refused_input_norm_leaves_the_anndata_unchanged():
    planted = _import("planted_signal")
    adata = planted.planted_signal_adata(n_cells=60)
    before = adata.copy()
    with pytest.raises(ValueError, match=r"input_norm'?\]?='bogus' is not one of"):
        _fit_runner(planted, adata, "bogus")
    assert_equal(adata, before)


def test_runner_save_and_load_keep_a_non_frozen_input_norm(tmp_path):
    import json

    import scdlkit as sck

    planted = _import("planted_signal")
    adata = planted.planted_signal_adata(n_cells=60)
    runner = _fit_runner(planted, adata, "layernorm")
    runner.save(tmp_path / "runner")
    manifest = json.loads((tmp_path / "runner" / "manifest.json").read_text())
    assert manifest["model_config"]["input_norm"] == "layernorm"
    loaded = sck.AnnotationRunner.load(tmp_path / "runner")
    assert loaded._best.model.input_norm == "layernorm"
    np.testing.assert_allclose(
        loaded.predict(adata)["probabilities"], runner.predict(adata)["probabilities"], atol=1e-5
    )


# ------------------------------------------------------------------------ post-norm adapter


@pytest.fixture
def encoder(checkpoint_dir):
    torch.manual_seed(0)
    return load_scgpt_model(checkpoint_dir, device="cpu")


def test_post_norm_adapter_wraps_norm1_and_starts_as_identity(encoder, batch):
    before = _hidden(encoder.eval(), batch)
    keys = set(encoder.state_dict())
    apply_adapter(encoder, AdapterConfig(bottleneck_dim=8, placement="post_norm"))
    freeze_except_peft(encoder)
    for layer in encoder.transformer_encoder.layers:
        assert isinstance(layer.norm1, AdapterLayerNorm)
        assert type(layer.self_attn.out_proj) is nn.Linear
        assert type(layer.linear2) is nn.Linear
        assert type(layer.norm2) is nn.LayerNorm
    # pretrained keys stay where the checkpoint has them; only the adapters are new and trained
    assert keys <= set(encoder.state_dict())
    names = peft_parameter_names(encoder)
    assert set(encoder.state_dict()) - keys == set(names)
    assert all(".norm1.adapter." in n for n in names)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    per_adapter = D * 8 + 8 + 8 * D + D
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == (
        N_LAYERS * per_adapter
    )
    torch.testing.assert_close(_hidden(encoder, batch), before, rtol=0, atol=0)


def test_post_norm_adapter_is_live_in_eval_mode(encoder, batch):
    before = _hidden(encoder.eval(), batch)
    apply_adapter(encoder, AdapterConfig(bottleneck_dim=8, placement="post_norm"))
    _perturb(encoder, [n for n in peft_parameter_names(encoder) if ".up." in n])
    after = _hidden(encoder.eval(), batch)
    assert not torch.allclose(after, before, atol=1e-3)
    # and in the bf16 inference copy that evaluation under autocast runs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = encoder.eval()(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert not torch.allclose(fast.float(), before, atol=5e-2)
    torch.testing.assert_close(fast.float(), after, atol=0.1, rtol=0.05)


def test_post_norm_adapter_is_per_token_after_norm1():
    torch.manual_seed(0)
    norm = nn.LayerNorm(D)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    wrapped = AdapterLayerNorm(norm, 8, "gelu", 0.0)
    assert wrapped.weight is norm.weight
    assert wrapped.bias is norm.bias
    _perturb(wrapped, ["adapter.up.weight", "adapter.up.bias"])
    x = torch.randn(2, 5, D)
    n = norm(x)
    adapter = wrapped.adapter
    expected = n + adapter.up(adapter.act(adapter.down(n)))
    torch.testing.assert_close(wrapped(x), expected)
    # token i's output depends on token i alone
    y = x.clone()
    y[:, 1:] = torch.randn(2, 4, D)
    torch.testing.assert_close(wrapped(y)[:, 0], wrapped(x)[:, 0])
    with pytest.raises(ValueError, match="already adapted"):
        AdapterLayerNorm(wrapped, 8, "gelu", 0.0)


def test_post_norm_adapter_sits_on_the_residual_sum(encoder, batch):
    """The adapter reads ``norm1(x + attn(x))``: with the attention output zeroed, what it reads
    is ``norm1(x)``, not the attention output (which the ``attention`` placement reads)."""
    apply_adapter(encoder, AdapterConfig(bottleneck_dim=8, placement="post_norm"))
    layer = encoder.transformer_encoder.layers[0]
    seen = {}
    layer.norm1.adapter.register_forward_pre_hook(lambda m, args: seen.update(n=args[0]))
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        attended = layer.self_attn(x, None)
        layer(x, None)
    expected = nn.functional.layer_norm(x + attended, (D,), layer.norm1.weight, layer.norm1.bias)
    torch.testing.assert_close(seen["n"], expected)


def test_post_norm_adapter_learns_and_agrees_in_train_and_eval(encoder, batch):
    for module in encoder.modules():  # switch every dropout off
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    apply_adapter(encoder, AdapterConfig(placement="post_norm"))
    freeze_except_peft(encoder)
    own = dict(encoder.named_parameters())
    names = peft_parameter_names(encoder)
    head = nn.Linear(D, 3)
    labels = torch.arange(12) % 3
    cls = encoder.train().cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
    nn.functional.cross_entropy(head(cls), labels).backward()
    ups = [n for n in names if ".up." in n]
    assert ups
    assert all(torch.count_nonzero(own[n].grad) > 0 for n in ups)
    torch.optim.AdamW([own[n] for n in names], lr=1e-2).step()
    torch.testing.assert_close(
        _hidden(encoder.train(), batch), _hidden(encoder.eval(), batch), rtol=1e-5, atol=1e-5
    )


def test_post_norm_adapter_round_trips_through_the_adaptation_state(state, ckpt, batch):
    config = {"bottleneck_dim": 8, "placement": "post_norm"}
    model = _build(state, ckpt, "adapter", strategy_config=config, seed=0)
    _perturb(model, [n for n, p in model.named_parameters() if p.requires_grad], 0.1)
    saved = {k: v.clone() for k, v in model.adaptation_state_dict().items()}
    assert "encoder.transformer_encoder.layers.0.norm1.adapter.up.weight" in saved
    assert "encoder.transformer_encoder.layers.0.norm1.weight" not in saved  # pretrained
    rebuilt = model.config_dict()
    assert rebuilt["strategy_config"]["placement"] == "post_norm"
    fresh = build_annotation_model(state, ckpt, **rebuilt, seed=1)
    assert isinstance(fresh.encoder.transformer_encoder.layers[1].norm1, AdapterLayerNorm)
    fresh.load_adaptation_state_dict(saved)
    torch.testing.assert_close(_logits(fresh.eval(), batch), _logits(model.eval(), batch))
    # an attention-placed adapter's state does not fit
    attention = _build(
        state, ckpt, "adapter", strategy_config={"bottleneck_dim": 8, "placement": "attention"}
    )
    assert isinstance(
        attention.encoder.transformer_encoder.layers[0].self_attn.out_proj, AdapterLinear
    )
    with pytest.raises(ValueError, match="does not fit"):
        attention.load_adaptation_state_dict(saved)


def test_adapter_config_accepts_post_norm_only_among_placements():
    assert AdapterConfig(placement="post_norm").placement == "post_norm"
    assert AdapterConfig.from_dict({"placement": "post_norm"}).to_dict()["placement"] == "post_norm"
    assert AdapterConfig().placement == "post_norm"  # scPEFT's, kept by the tuning rule
    with pytest.raises(ValueError, match="placement must be one of"):
        AdapterConfig(placement="norm2")


# ------------------------------------------------------------------------ tuning script


def test_tuning_rule_keeps_the_published_value_unless_clearly_beaten():
    tune = _import("tune_defaults")
    values = ("a", "b", "c")
    # b is ahead by 0.10 with sds of 0.02: chosen
    scores = [[0.50, 0.52, 0.48], [0.60, 0.62, 0.58], [0.40, 0.41, 0.39]]
    assert tune.choose(values, scores, "a")[0] == "b"
    # b ahead by 0.02 with sds of 0.05: the published value stays
    noisy = [[0.45, 0.50, 0.55], [0.47, 0.52, 0.57], [0.1, 0.1, 0.1]]
    chosen, reason = tune.choose(values, noisy, "a")
    assert chosen == "a"
    assert "published kept" in reason
    # the published value is best: kept
    assert tune.choose(values, scores, "b")[0] == "b"
    # one seed has no sd: the published value stays
    assert tune.choose(values, [[0.1], [0.9], [0.2]], "a")[0] == "a"
    assert math.isclose(tune.pooled_sd([0.0, 2.0], [0.0, 0.0]), 1.0)


def test_tuning_default_takes_a_value_clearly_ahead_on_one_data_and_not_behind_on_the_other():
    tune = _import("tune_defaults")
    planted = {"a": [0.5, 0.52, 0.48], "b": [0.9, 0.92, 0.88]}  # b clearly ahead
    level = {"a": [0.56, 0.60, 0.52], "b": [0.57, 0.61, 0.53]}  # b not behind
    behind = {"a": [0.60, 0.62, 0.58], "b": [0.40, 0.42, 0.38]}  # b clearly behind
    data = ["planted", "pbmc"]
    chosen = {"planted": "b", "pbmc": "a"}
    assert tune.default_of(chosen, {"planted": planted, "pbmc": level}, "a", data) == "b"
    assert tune.default_of(chosen, {"planted": planted, "pbmc": behind}, "a", data) == "a"
    assert tune.default_of({"planted": "b"}, {"planted": planted}, "a", data) == "a"  # not run
    both = {"planted": "b", "pbmc": "b"}
    assert tune.default_of(both, {"planted": planted, "pbmc": planted}, "a", data) == "b"
    split = {"planted": "b", "pbmc": "c"}  # two different new values: published kept
    scores = {"planted": {**planted, "c": [0.1] * 3}, "pbmc": {**planted, "c": [0.95] * 3}}
    assert tune.default_of(split, scores, "a", data) == "a"


def test_tuning_search_starts_from_published_values():
    tune = _import("tune_defaults")
    assert set(tune.SEARCH) == {"full_finetune", "lora", "adapter", "prefix_tuning", "ia3"}
    published = {s: {x.name: x.published for x in v} for s, v in tune.SEARCH.items()}
    assert published["full_finetune"]["lr"] == 1e-4  # scGPT's tutorial
    assert published["full_finetune"]["encoder_dropout"] == 0.2
    assert published["lora"]["target_modules"] == ("q", "v")  # scPEFT's
    assert published["adapter"]["placement"] == "post_norm"  # scPEFT's
    # the rate first (nothing else can be judged at a rate that does not learn), then the input
    assert all(v[0].name == "lr" and v[1].name == "input_norm" for v in tune.SEARCH.values())
    assert published["lora"]["lr"] == 5e-4  # the LoRA paper's
    assert published["adapter"]["lr"] == published["prefix_tuning"]["lr"] == 5e-5  # scPEFT's
    training, configs, input_norm = tune.runner_arguments(
        "lora",
        {"input_norm": "layernorm", "lr": 1e-3, "target_modules": ("q", "v")},
        tune.SEARCH["lora"],
        {"min_steps": 10},
    )
    assert training == {"lora": {"min_steps": 10, "lr": 1e-3}}
    assert configs == {"lora": {"target_modules": ["q", "v"]}}
    assert input_norm == "layernorm"


def test_tune_defaults_quick_writes_the_table(tmp_path, capsys):
    tune = _import("tune_defaults")
    out = tmp_path / "tuning.md"
    decisions = tune.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert "| data | strategy | setting | value |" in text
    assert "val macro-F1" in text
    assert "test accuracy (not used)" in text
    assert "Machine:" in text
    # one row per candidate and data setting, each with mean ± sd over two seeds
    rows = [line for line in text.splitlines() if line.startswith(("| planted |", "| pbmc |"))]
    assert len(rows) == 4
    assert all("±" in row for row in rows)
    assert list(decisions["setting"]) == ["input_norm"]
    assert decisions["default"].iloc[0] in {"frozen", "layernorm"}
    printed = capsys.readouterr().out
    assert "chosen:" in printed
