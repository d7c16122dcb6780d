from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from scdlkit.foundation._annotation_model import (
    DEFAULT_CLASSIFIER_DROPOUT,
    TUNING_STRATEGIES,
    ScGPTAnnotationModel,
    build_annotation_model,
    load_scgpt_annotation_model,
)
from scdlkit.foundation.models.scgpt._checkpoint import ScGPTModelArgs, resolve_checkpoint
from scdlkit.foundation.models.scgpt._genes import tokenize_adata
from scdlkit.foundation.models.scgpt._loading import load_state_dict_file
from scdlkit.foundation.models.scgpt._model import ScGPTEncoder
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens
from scdlkit.foundation.peft import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    PrefixTuningConfig,
    merge_lora,
    peft_parameter_names,
)

D, D_HID, N_LAYERS, N_CLASSES = 32, 64, 2, 5
HEAD = 2 * (D * D + D + 2 * D) + D * N_CLASSES + N_CLASSES  # n_layers_cls = 3
# small configs that fit the tiny checkpoint (d_model 32), every dropout 0
CONFIGS = {
    "head": None,
    "full_finetune": None,
    "lora": LoRAConfig(rank=4, dropout=0.0),
    "adapter": AdapterConfig(bottleneck_dim=8),
    "prefix_tuning": PrefixTuningConfig(prefix_length=4),
    "ia3": IA3Config(),
}
PEFT_COUNTS = {
    "lora": N_LAYERS * 3 * 4 * (D + D),  # query, key and value
    "adapter": N_LAYERS * (2 * D * 8 + 8 + D),
    "prefix_tuning": N_LAYERS * 2 * 4 * D,
    "ia3": N_LAYERS * (2 * D + D_HID),
}
PEFT = tuple(PEFT_COUNTS)


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir):
    return resolve_checkpoint(checkpoint_dir)


@pytest.fixture(scope="module")
def ckpt_no_dropout(checkpoint_dir):
    ckpt = resolve_checkpoint(checkpoint_dir)
    return dataclasses.replace(ckpt, args=dataclasses.replace(ckpt.args, dropout=0.0))


@pytest.fixture(scope="module")
def state(ckpt):
    return load_state_dict_file(ckpt.weights_path)


@pytest.fixture(scope="module")
def batch(ckpt, checkpoint_dir):
    import anndata as ad

    adata = ad.read_h5ad(checkpoint_dir.parent / "data.h5ad")
    tokens, _ = tokenize_adata(adata, ckpt)
    return collate_tokens(tokens, range(12))


def _build(state, ckpt, strategy, **kwargs):
    kwargs.setdefault("strategy_config", CONFIGS[strategy])
    kwargs.setdefault("num_classes", N_CLASSES)
    return build_annotation_model(state, ckpt, tuning_strategy=strategy, **kwargs)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)["logits"]


def _perturb(model: nn.Module, names) -> None:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            p = params[name]
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _own_params(model: ScGPTAnnotationModel) -> list[str]:
    """The strategy's own encoder parameters, as model parameter names."""
    if model.tuning_strategy == "full_finetune":
        return [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    return [f"encoder.{n}" for n in peft_parameter_names(model.encoder)]


# ---------------------------------------------------------------------------- trainable parameters


@pytest.mark.parametrize("strategy", TUNING_STRATEGIES)
def test_exactly_the_intended_parameters_train(state, ckpt, strategy):
    model = _build(state, ckpt, strategy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.named_parameters() if n.startswith("cls_decoder.")}
    encoder = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    encoder_total = sum(p.numel() for p in model.encoder.parameters())
    if strategy == "head":
        assert trainable == head
        expected = HEAD
    elif strategy == "full_finetune":
        assert trainable == head | encoder
        expected = HEAD + encoder_total
    else:
        assert trainable == head | set(_own_params(model))
        expected = HEAD + PEFT_COUNTS[strategy]
    assert model.trainable_parameter_count() == expected
    assert model.tuning_strategy == strategy
    assert model.num_classes == N_CLASSES
    assert model.strategy_config == CONFIGS[strategy]


def test_head_matches_upstream_cls_decoder_names(state, ckpt):
    model = _build(state, ckpt, "head")
    head = [k for k in model.state_dict() if k.startswith("cls_decoder.")]
    assert head == [
        "cls_decoder._decoder.0.weight",
        "cls_decoder._decoder.0.bias",
        "cls_decoder._decoder.2.weight",
        "cls_decoder._decoder.2.bias",
        "cls_decoder._decoder.3.weight",
        "cls_decoder._decoder.3.bias",
        "cls_decoder._decoder.5.weight",
        "cls_decoder._decoder.5.bias",
        "cls_decoder.out_layer.weight",
        "cls_decoder.out_layer.bias",
    ]
    assert isinstance(model.cls_decoder._decoder[1], nn.ReLU)
    assert isinstance(model.cls_decoder._decoder[2], nn.LayerNorm)
    assert model.classifier_dropout == DEFAULT_CLASSIFIER_DROPOUT


# ---------------------------------------------------------------------------- starting point


@pytest.mark.parametrize("strategy", ["lora", "adapter", "ia3", "full_finetune"])
def test_identity_start_equals_frozen_encoder_and_same_head(state, ckpt, batch, strategy):
    reference = _build(state, ckpt, "head")
    model = _build(state, ckpt, strategy)
    for name, value in reference.cls_decoder.state_dict().items():  # same seed, same head
        assert torch.equal(model.cls_decoder.state_dict()[name], value)
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=0, atol=0)


def test_prefix_start_differs_only_by_the_prefix(state, ckpt, batch):
    reference = _build(state, ckpt, "head")
    model = _build(state, ckpt, "prefix_tuning")
    assert not torch.allclose(_logits(model, batch), _logits(reference, batch), atol=1e-5)
    for layer in model.encoder.transformer_encoder.layers:
        layer.self_attn.prefix = None
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", [*PEFT, "full_finetune"])
def test_own_parameters_change_eval_outputs(state, ckpt, batch, strategy):
    model = _build(state, ckpt, strategy)
    before = _logits(model.eval(), batch)
    own = _own_params(model)
    if strategy == "full_finetune":
        own = [n for n in own if ".transformer_encoder." in n]
    _perturb(model, own)
    after = _logits(model.eval(), batch)
    assert not torch.allclose(after, before, atol=1e-4)


@pytest.mark.parametrize("strategy", TUNING_STRATEGIES)
def test_train_and_eval_agree_without_dropout(state, ckpt_no_dropout, batch, strategy):
    model = _build(state, ckpt_no_dropout, strategy, classifier_dropout=0.0)
    _perturb(model, _own_params(model))
    eval_out = _logits(model.eval(), batch)
    train_out = _logits(model.train(), batch)
    torch.testing.assert_close(train_out, eval_out, rtol=1e-5, atol=1e-5)


def test_head_keeps_encoder_in_eval(state, ckpt, batch):
    model = _build(state, ckpt, "head")
    model.train()
    assert model.training
    assert model.cls_decoder.training
    assert not any(m.training for m in model.encoder.modules())
    # features computed once give the same logits as running the encoder
    model.eval()
    features = model.encode(batch)
    assert not features.requires_grad
    torch.testing.assert_close(_logits(model, {"features": features}), _logits(model, batch))
    out = model(batch)
    assert out["latent"].shape == (12, D)
    assert out["logits"].shape == (12, N_CLASSES)
    lora = _build(state, ckpt, "lora").train()
    assert lora.encoder.training


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("strategy", TUNING_STRATEGIES)
def test_adaptation_state_round_trip(state, ckpt, batch, strategy):
    model = _build(state, ckpt, strategy, seed=0)
    _perturb(model, [n for n, p in model.named_parameters() if p.requires_grad])
    saved = {k: v.clone() for k, v in model.adaptation_state_dict().items()}
    head_keys = {k for k in saved if k.startswith(("cls_decoder.", "feature_norm."))}
    assert {"feature_norm.shift", "feature_norm.scale"} <= set(saved)
    if strategy == "head":
        assert set(saved) == head_keys
    elif strategy == "full_finetune":
        assert set(saved) == set(model.state_dict())
    else:
        assert set(saved) == head_keys | set(_own_params(model))
    fresh = _build(state, ckpt, strategy, seed=1)
    assert not torch.allclose(_logits(fresh.eval(), batch), _logits(model.eval(), batch))
    fresh.load_adaptation_state_dict(saved)
    torch.testing.assert_close(_logits(fresh.eval(), batch), _logits(model.eval(), batch))


def test_load_adaptation_state_is_strict(state, ckpt):
    model = _build(state, ckpt, "lora")
    saved = model.adaptation_state_dict()
    missing = {k: v for k, v in saved.items() if "lora_A.q" not in k}
    with pytest.raises(ValueError, match=r"missing keys \['encoder\.transformer_encoder"):
        model.load_adaptation_state_dict(missing)
    extra = {**saved, "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['encoder\.extra\.weight'\]"):
        model.load_adaptation_state_dict(extra)
    wrong = {**saved, "cls_decoder.out_layer.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"'cls_decoder.out_layer.bias' has shape \(7,\)"):
        model.load_adaptation_state_dict(wrong)
    ia3 = _build(state, ckpt, "ia3")
    with pytest.raises(ValueError, match="does not fit this 'ia3' model"):
        ia3.load_adaptation_state_dict(saved)


def test_merge_lora_keeps_outputs(state, ckpt, batch):
    model = _build(
        state, ckpt, "lora", strategy_config=LoRAConfig(target_modules=("q", "v", "linear1"))
    )
    _perturb(model, _own_params(model))
    before = _logits(model.eval(), batch)
    merge_lora(model)
    torch.testing.assert_close(_logits(model, batch), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="merge_lora"):
        model.adaptation_state_dict()


def test_build_is_deterministic_and_leaves_global_rng(state, ckpt, batch):
    rng = torch.get_rng_state()
    a = _build(state, ckpt, "prefix_tuning", seed=3)
    b = _build(state, ckpt, "prefix_tuning", seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    c = _build(state, ckpt, "prefix_tuning", seed=4)
    assert not torch.equal(c.cls_decoder.out_layer.weight, a.cls_decoder.out_layer.weight)
    # strategies built from one in-memory state never share storage
    assert (
        a.encoder.encoder.embedding.weight.data_ptr()
        != b.encoder.encoder.embedding.weight.data_ptr()
    )
    assert (
        state["encoder.embedding.weight"].data_ptr()
        != a.encoder.encoder.embedding.weight.data_ptr()
    )


def test_load_matches_build(checkpoint_dir, state, ckpt, batch):
    loaded = load_scgpt_annotation_model(
        N_CLASSES,
        label_categories=list("abcde"),
        checkpoint=checkpoint_dir,
        tuning_strategy="lora",
        strategy_config={"rank": 4, "dropout": 0.0},
        device="cpu",
    )
    built = _build(state, ckpt, "lora", label_categories=list("abcde"))
    assert not loaded.training
    assert loaded.label_categories == list("abcde")
    assert loaded.strategy_config == LoRAConfig(rank=4, dropout=0.0)
    assert loaded.encoder.load_report is not None
    torch.testing.assert_close(_logits(loaded, batch), _logits(built, batch), rtol=0, atol=0)
    config = built.config_dict()
    assert config["strategy_config"] == LoRAConfig(rank=4, dropout=0.0).to_dict()
    rebuilt = build_annotation_model(state, ckpt, **config)
    torch.testing.assert_close(_logits(rebuilt, batch), _logits(built, batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tuning_strategy": "frozen_probe"}, "logistic regression on frozen <cls> features"),
        ({"tuning_strategy": "baseline"}, "without scGPT"),
        ({"tuning_strategy": "loraa"}, r"unknown tuning_strategy='loraa'.*'head', 'full_finetune'"),
        ({"tuning_strategy": "lora", "strategy_config": AdapterConfig()}, "needs a LoRAConfig"),
        ({"tuning_strategy": "head", "strategy_config": LoRAConfig()}, "takes no strategy_config"),
        ({"tuning_strategy": "lora", "strategy_config": {"r": 4}}, "unknown LoRAConfig keys: 'r'"),
        ({"tuning_strategy": "ia3", "strategy_config": {"targets": ["x"]}}, "unknown entries 'x'"),
        ({"label_categories": ["a", "b"]}, "label_categories has 2 entries but num_classes=5"),
        ({"label_categories": list("aabcd")}, "duplicate names"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ],
)
def test_bad_arguments_fail_before_reading_weights(kwargs, match, tmp_path):
    kwargs = {"num_classes": N_CLASSES, **kwargs}
    # a checkpoint that does not exist: the argument error must come first
    with pytest.raises(ValueError, match=match):
        load_scgpt_annotation_model(checkpoint=tmp_path / "nowhere", device="cpu", **kwargs)


def test_build_rejects_bad_arguments(state, ckpt):
    with pytest.raises(ValueError, match="frozen_probe"):
        build_annotation_model(state, ckpt, num_classes=3, tuning_strategy="frozen_probe")
    with pytest.raises(ValueError, match="classifier_dropout must be a number"):
        _build(state, ckpt, "head", classifier_dropout=1.5)
    with pytest.raises(ValueError, match="bottleneck_dim=128 must be smaller"):
        _build(state, ckpt, "adapter", strategy_config={"bottleneck_dim": 128})
    with pytest.raises(ValueError, match="checkpoint is missing encoder weights"):
        _build({"encoder.embedding.weight": state["encoder.embedding.weight"]}, ckpt, "head")


# ---------------------------------------------------------------------------- whole-human size


def test_whole_human_counts_on_meta_device():
    args = ScGPTModelArgs()
    head = 2 * (512 * 512 + 512 + 2 * 512) + 512 * 10 + 10
    expected = {
        "head": head,
        "lora": head + 12 * 3 * 8 * (512 + 512),
        "adapter": head + 12 * (2 * 512 * 128 + 128 + 512),
        "prefix_tuning": head + 12 * 2 * 8 * 512,
        "ia3": head + 12 * (2 * 512 + 512),
    }
    for strategy, count in expected.items():
        with torch.device("meta"):
            encoder = ScGPTEncoder(args, n_tokens=60697, pad_id=60694)
            model = ScGPTAnnotationModel(encoder, 10, tuning_strategy=strategy)
        assert model.trainable_parameter_count() == count, strategy


# ---------------------------------------------------------------------------- training sanity


@pytest.fixture(scope="module")
def pbmc_batch(_pbmc_raw, ckpt):
    """32 pbmc68k cells (several classes), each cut to 23 genes (seeded) to keep the test fast."""
    adata = _pbmc_raw[np.arange(0, 700, 21)[:32]]
    tokens, _ = tokenize_adata(adata, ckpt)
    tokens = dataclasses.replace(tokens, max_seq_len=24)
    batch = collate_tokens(tokens, range(tokens.n_cells))
    codes = adata.obs["bulk_labels"].cat.codes.to_numpy().astype(np.int64)
    batch["labels"] = torch.from_numpy(codes)
    return batch


@pytest.mark.parametrize("strategy", TUNING_STRATEGIES)
def test_a_few_adam_steps_reduce_the_loss(state, ckpt, pbmc_batch, strategy):
    torch.manual_seed(0)  # dropout masks
    n_classes = 10
    model = _build(state, ckpt, strategy, num_classes=n_classes).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=3e-3 if strategy != "full_finetune" else 2e-3)
    own = {n: p.detach().clone() for n, p in model.named_parameters() if n in _own_params(model)}
    batch = pbmc_batch
    if strategy == "head":
        batch = {"features": model.encode(pbmc_batch), "labels": pbmc_batch["labels"]}

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(batch)["logits"], batch["labels"])
        model.train()
        return float(loss)

    start = loss_now()
    for _ in range(8):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(batch)["logits"], batch["labels"])
        loss.backward()
        optimiser.step()
    assert loss_now() < 0.8 * start
    current = dict(model.named_parameters())
    for name, before in own.items():  # the strategy's own parameters learned too
        assert not torch.equal(current[name], before), name


def test_feature_standardiser_is_identity_until_fitted(state, ckpt, batch):
    model = _build(state, ckpt, "head", seed=0).eval()
    features = model.encode(batch)
    before = model({"features": features})["logits"]
    torch.testing.assert_close(model.feature_norm(features), features)
    model.feature_norm.fit(features)
    standardised = model.feature_norm(features)
    assert standardised.mean(0).abs().max() < 1e-3
    assert not torch.allclose(model({"features": features})["logits"], before)
