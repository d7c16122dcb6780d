from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scdlkit.foundation.models.scgpt._checkpoint import ScGPTModelArgs, resolve_checkpoint
from scdlkit.foundation.models.scgpt._genes import tokenize_adata
from scdlkit.foundation.models.scgpt._loading import load_scgpt_model
from scdlkit.foundation.models.scgpt._model import ScGPTEncoder
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens
from scdlkit.foundation.peft import (
    AdapterConfig,
    AdapterLinear,
    IA3Config,
    IA3Linear,
    LoRAConfig,
    LoRALinear,
    PEFTConfig,
    PrefixTuningConfig,
    ScGPTLoRAConfig,
    apply_adapter,
    apply_ia3,
    apply_lora,
    apply_peft,
    apply_prefix_tuning,
    freeze_except_peft,
    merge_lora,
    peft_parameter_names,
    resolve_strategy_config,
)

D, D_HID, N_LAYERS = 32, 64, 2  # the tiny fixture checkpoint


@pytest.fixture(scope="module")
def batch(checkpoint_dir) -> dict[str, torch.Tensor]:
    import anndata as ad

    adata = ad.read_h5ad(checkpoint_dir.parent / "data.h5ad")
    tokens, _ = tokenize_adata(adata, resolve_checkpoint(checkpoint_dir))
    return collate_tokens(tokens, range(12))


@pytest.fixture
def encoder(checkpoint_dir) -> ScGPTEncoder:
    torch.manual_seed(0)
    return load_scgpt_model(checkpoint_dir, device="cpu")


def _hidden(model: ScGPTEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["gene_ids"], batch["values"], batch["padding_mask"])


def _perturb(model: nn.Module, names: list[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(torch.randn_like(params[name]) * 0.5)


def _trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- configs

CONFIGS = [
    LoRAConfig(),
    LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=("v", "linear2"), layers=(1,)),
    AdapterConfig(),
    AdapterConfig(bottleneck_dim=8, dropout=0.1, activation="relu", placement="both", layers=[0]),
    PrefixTuningConfig(),
    PrefixTuningConfig(prefix_length=3, dropout=0.2, init="random", layers=(0, 1)),
    IA3Config(),
    IA3Config(targets=("ff",), layers=(0,)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c))
def test_config_round_trip(config):
    data = config.to_dict()
    assert all(not isinstance(v, tuple) for v in data.values())  # JSON-ready
    back = type(config).from_dict(data)
    assert back == config
    assert isinstance(back, PEFTConfig)


def test_config_defaults_follow_published_recipes():
    lora = LoRAConfig()
    assert (lora.rank, lora.alpha, lora.target_modules, lora.layers) == (
        8,
        16.0,
        ("q", "k", "v"),
        None,
    )
    assert lora.scaling == 2.0
    adapter = AdapterConfig()
    assert (adapter.bottleneck_dim, adapter.placement, adapter.activation) == (
        None,
        "post_norm",
        "gelu",
    )
    assert PrefixTuningConfig().prefix_length == 8
    assert IA3Config().targets == ("k", "v", "ff")
    assert ScGPTLoRAConfig is LoRAConfig


def test_config_normalises_names_and_layers():
    config = LoRAConfig(target_modules=["v", "out_proj", "q"], layers=[1, 0])
    assert config.target_modules == ("q", "v", "out_proj")
    assert config.layers == (0, 1)
    assert LoRAConfig(target_modules="k").target_modules == ("k",)
    assert LoRAConfig(layers=1).layers == (1,)
    assert LoRAConfig(target_modules=("v", "k", "q")) == LoRAConfig()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown LoRAConfig keys: 'r', 'lora_alpha'"):
        LoRAConfig.from_dict({"r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match="expects a dict"):
        IA3Config.from_dict([("targets", ("k",))])


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (LoRAConfig, {"rank": 0}, "rank must be a positive integer"),
        (LoRAConfig, {"rank": 2.5}, "rank must be a positive integer"),
        (LoRAConfig, {"rank": True}, "rank must be a positive integer"),
        (LoRAConfig, {"alpha": 0}, "alpha must be a positive number"),
        (LoRAConfig, {"alpha": math.nan}, "alpha must be a positive number"),
        (LoRAConfig, {"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        (LoRAConfig, {"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        (LoRAConfig, {"target_modules": ("q", "Wqkv")}, "unknown entries 'Wqkv'"),
        (LoRAConfig, {"target_modules": ()}, "non-empty sequence"),
        (LoRAConfig, {"target_modules": ("q", "q")}, "lists a name twice"),
        (LoRAConfig, {"layers": (-1,)}, "layer indices >= 0"),
        (LoRAConfig, {"layers": ()}, "layer indices >= 0"),
        (LoRAConfig, {"layers": (0, 0)}, "lists a layer twice"),
        (AdapterConfig, {"bottleneck_dim": 0}, "bottleneck_dim must be a positive integer"),
        (AdapterConfig, {"activation": "tanh"}, "activation must be one of 'relu', 'gelu'"),
        (AdapterConfig, {"placement": "output"}, "placement must be one of"),
        (PrefixTuningConfig, {"prefix_length": 0}, "prefix_length must be a positive integer"),
        (PrefixTuningConfig, {"init": "zeros"}, "init must be one of 'random', 'vocab'"),
        (IA3Config, {"targets": ("q",)}, "unknown entries 'q'"),
    ],
)
def test_config_rejects_bad_values(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    with pytest.raises(ValueError, match=match):
        cls.from_dict(kwargs)


def test_resolve_strategy_config():
    assert resolve_strategy_config("lora", None) == LoRAConfig()
    assert resolve_strategy_config("ia3", {"targets": ["k"]}) == IA3Config(targets=("k",))
    config = AdapterConfig(bottleneck_dim=4)
    assert resolve_strategy_config("adapter", config) is config
    assert resolve_strategy_config("head", None) is None
    assert resolve_strategy_config("full_finetune", {}) is None
    with pytest.raises(ValueError, match=r"'lora' needs a LoRAConfig.*got AdapterConfig"):
        resolve_strategy_config("lora", AdapterConfig())
    with pytest.raises(ValueError, match="'head' takes no strategy_config"):
        resolve_strategy_config("head", LoRAConfig())


# ---------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize(
    "targets", [("q", "v"), ("q", "k", "v"), ("out_proj", "linear1", "linear2"), ("k", "linear2")]
)
def test_lora_starts_at_identity_and_counts(encoder, batch, targets):
    before = _hidden(encoder, batch)
    apply_lora(encoder, LoRAConfig(rank=4, target_modules=targets))
    freeze_except_peft(encoder)
    torch.testing.assert_close(_hidden(encoder.eval(), batch), before, rtol=0, atol=0)
    dims = {
        "q": (D, D),
        "k": (D, D),
        "v": (D, D),
        "out_proj": (D, D),
        "linear1": (D, D_HID),
        "linear2": (D_HID, D),
    }
    expected = N_LAYERS * sum(4 * (d_in + d_out) for d_in, d_out in (dims[t] for t in targets))
    trainable = _trainable(encoder)
    assert sum(trainable.values()) == expected
    assert set(trainable) == set(peft_parameter_names(encoder))
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_lora_touches_only_its_row_blocks(encoder):
    apply_lora(encoder, LoRAConfig(target_modules=("k",), dropout=0.0))
    wqkv = encoder.transformer_encoder.layers[0].self_attn.Wqkv
    assert isinstance(wqkv, LoRALinear)
    x = torch.randn(3, 5, D)
    base = torch.nn.functional.linear(x, wqkv.weight, wqkv.bias)
    _perturb(wqkv, ["lora_B.k"])
    out = wqkv(x)
    torch.testing.assert_close(out[..., :D], base[..., :D], rtol=0, atol=0)  # q untouched
    torch.testing.assert_close(out[..., 2 * D :], base[..., 2 * D :], rtol=0, atol=0)  # v too
    assert not torch.allclose(out[..., D : 2 * D], base[..., D : 2 * D])
    expected_k = base[..., D : 2 * D] + x @ (wqkv.delta_weight("k")).T
    torch.testing.assert_close(out[..., D : 2 * D], expected_k, rtol=1e-5, atol=1e-5)


def test_lora_layers_subset(encoder):
    apply_lora(encoder, LoRAConfig(layers=(1,)))
    layers = encoder.transformer_encoder.layers
    assert type(layers[0].self_attn.Wqkv) is nn.Linear
    assert isinstance(layers[1].self_attn.Wqkv, LoRALinear)
    with pytest.raises(ValueError, match=r"names layers \[5\] but the encoder has 2 layers"):
        apply_lora(encoder, LoRAConfig(layers=(5,)))


def test_lora_keeps_base_key_names(encoder):
    base_keys = set(encoder.state_dict())
    apply_lora(encoder, LoRAConfig(target_modules=("q", "v", "out_proj", "linear1")))
    keys = set(encoder.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == set(peft_parameter_names(encoder))


def test_lora_changes_eval_outputs_and_merges(encoder, batch):
    base = _hidden(encoder.eval(), batch)
    apply_lora(encoder, LoRAConfig(target_modules=("q", "v", "out_proj", "linear2")))
    _perturb(encoder, [n for n in peft_parameter_names(encoder) if "lora_B" in n])
    adapted = _hidden(encoder.eval(), batch)
    assert not torch.allclose(adapted, base, atol=1e-3)
    merged = merge_lora(encoder)
    assert merged is encoder
    assert not any(isinstance(m, LoRALinear) for m in encoder.modules())
    assert type(encoder.transformer_encoder.layers[0].self_attn.Wqkv) is nn.Linear
    assert peft_parameter_names(encoder) == []
    torch.testing.assert_close(_hidden(encoder, batch), adapted, rtol=1e-5, atol=1e-5)


def test_double_application_is_refused(encoder):
    apply_lora(encoder)
    with pytest.raises(ValueError, match="already adapted"):
        apply_ia3(encoder)
    apply_prefix_tuning(encoder, PrefixTuningConfig(init="random"))
    with pytest.raises(ValueError, match="already has attention prefixes"):
        apply_prefix_tuning(encoder)


def test_apply_peft_dispatch_and_type_checks(encoder):
    assert apply_peft(encoder, IA3Config()) is encoder
    assert isinstance(encoder.transformer_encoder.layers[0].linear2, IA3Linear)
    with pytest.raises(ValueError, match="no adaptation method for PEFTConfig"):
        apply_peft(encoder, PEFTConfig())
    with pytest.raises(ValueError, match="apply_lora needs a LoRAConfig"):
        apply_lora(encoder, IA3Config())
    with pytest.raises(TypeError, match="expected a foundation-model encoder"):
        apply_lora(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- adapters


@pytest.mark.parametrize(("placement", "per_layer"), [("attention", 1), ("ffn", 1), ("both", 2)])
def test_adapter_identity_counts_and_effect(encoder, batch, placement, per_layer):
    before = _hidden(encoder.eval(), batch)
    apply_adapter(encoder, AdapterConfig(bottleneck_dim=8, placement=placement))
    freeze_except_peft(encoder)
    layer = encoder.transformer_encoder.layers[0]
    assert isinstance(layer.self_attn.out_proj, AdapterLinear) == (placement != "ffn")
    assert isinstance(layer.linear2, AdapterLinear) == (placement != "attention")
    torch.testing.assert_close(_hidden(encoder, batch), before, rtol=0, atol=0)
    per_adapter = D * 8 + 8 + 8 * D + D
    assert sum(_trainable(encoder).values()) == N_LAYERS * per_layer * per_adapter
    _perturb(encoder, [n for n in peft_parameter_names(encoder) if ".up." in n])
    assert not torch.allclose(_hidden(encoder.eval(), batch), before, atol=1e-3)


def test_adapter_bottleneck_must_be_narrower_than_model(encoder):
    with pytest.raises(ValueError, match=r"bottleneck_dim=128 must be smaller than .* d_model=32"):
        apply_adapter(encoder, AdapterConfig(bottleneck_dim=128))


def test_adapter_default_width_is_a_quarter_of_the_model(encoder):
    apply_adapter(encoder)  # scPEFT's 512 -> 128 -> 512, scaled to d_model=32
    freeze_except_peft(encoder)
    per_adapter = D * 8 + 8 + 8 * D + D
    assert sum(_trainable(encoder).values()) == N_LAYERS * per_adapter


# ---------------------------------------------------------------------------- IA3


def test_ia3_identity_counts_and_effect(encoder, batch):
    before = _hidden(encoder.eval(), batch)
    apply_ia3(encoder)
    freeze_except_peft(encoder)
    torch.testing.assert_close(_hidden(encoder, batch), before, rtol=0, atol=0)
    assert sum(_trainable(encoder).values()) == N_LAYERS * (2 * D + D_HID)
    for name in peft_parameter_names(encoder):
        assert torch.equal(
            dict(encoder.named_parameters())[name], torch.ones(D_HID if "ff" in name else D)
        )
    _perturb(encoder, peft_parameter_names(encoder))
    assert not torch.allclose(_hidden(encoder.eval(), batch), before, atol=1e-3)


def test_ia3_scales_only_keys_and_values(encoder):
    apply_ia3(encoder, IA3Config(targets=("v",)))
    wqkv = encoder.transformer_encoder.layers[0].self_attn.Wqkv
    x = torch.randn(2, 4, D)
    base = torch.nn.functional.linear(x, wqkv.weight, wqkv.bias)
    with torch.no_grad():
        wqkv.ia3_scale["v"].fill_(3.0)
    out = wqkv(x)
    torch.testing.assert_close(out[..., : 2 * D], base[..., : 2 * D], rtol=0, atol=0)
    torch.testing.assert_close(out[..., 2 * D :], 3 * base[..., 2 * D :])


# ---------------------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("init", ["vocab", "random"])
def test_prefix_tuning_joins_attention(encoder, batch, init):
    before = _hidden(encoder.eval(), batch)
    apply_prefix_tuning(encoder, PrefixTuningConfig(prefix_length=4, init=init))
    freeze_except_peft(encoder)
    assert sum(_trainable(encoder).values()) == N_LAYERS * 2 * 4 * D
    with_prefix = _hidden(encoder, batch)
    assert with_prefix.shape == before.shape  # prefixes are not tokens
    assert not torch.allclose(with_prefix, before, atol=1e-4)
    _perturb(encoder, peft_parameter_names(encoder))
    assert not torch.allclose(_hidden(encoder, batch), with_prefix, atol=1e-4)
    prefixes = [layer.self_attn.prefix for layer in encoder.transformer_encoder.layers]
    for layer in encoder.transformer_encoder.layers:
        layer.self_attn.prefix = None
    torch.testing.assert_close(_hidden(encoder, batch), before, rtol=0, atol=0)
    assert all(p.prefix_length == 4 for p in prefixes)


def test_prefix_respects_padding(encoder, batch):
    """A padded cell gives the same output as the same cell alone: the mask is extended."""
    apply_prefix_tuning(encoder, PrefixTuningConfig(prefix_length=4))
    encoder.eval()
    full = _hidden(encoder, batch)
    lengths = (~batch["padding_mask"]).sum(1)
    row = int(lengths.argmin())
    n = int(lengths[row])
    assert n < batch["gene_ids"].shape[1]  # the row is padded in the batch
    single = {k: v[row : row + 1, :n] for k, v in batch.items()}
    torch.testing.assert_close(_hidden(encoder, single)[0], full[row, :n], rtol=1e-4, atol=1e-5)


def test_prefix_vocab_init_is_real_activations(encoder):
    """Vocabulary init gives keys on the scale of the layer's real keys, random init is tiny."""
    torch.manual_seed(0)
    apply_prefix_tuning(encoder, PrefixTuningConfig(prefix_length=8, init="vocab"))
    vocab_keys = encoder.transformer_encoder.layers[0].self_attn.prefix.keys.detach()
    w_k = encoder.transformer_encoder.layers[0].self_attn.Wqkv.bias[D : 2 * D]
    assert torch.isfinite(vocab_keys).all()
    assert vocab_keys.std() > 0.1
    # rows differ (different genes), and none is just the key bias
    assert not torch.allclose(vocab_keys[0], vocab_keys[1])
    assert not torch.allclose(vocab_keys[0], w_k.detach())


# ---------------------------------------------------------------------------- train == eval


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(dropout=0.0, target_modules=("q", "v", "linear1")),
        AdapterConfig(bottleneck_dim=8, placement="both"),
        PrefixTuningConfig(prefix_length=4),
        IA3Config(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_train_and_eval_agree_without_dropout(checkpoint_dir, batch, config):
    ckpt = resolve_checkpoint(checkpoint_dir)
    torch.manual_seed(0)
    encoder = load_scgpt_model(ckpt, device="cpu")
    for module in encoder.modules():  # switch every dropout off
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    apply_peft(encoder, config)
    _perturb(encoder, peft_parameter_names(encoder))
    eval_out = _hidden(encoder.eval(), batch)
    train_out = _hidden(encoder.train(), batch)
    torch.testing.assert_close(train_out, eval_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- one optimiser step


@pytest.mark.parametrize(
    "config",
    [LoRAConfig(dropout=0.0), AdapterConfig(), PrefixTuningConfig(), IA3Config()],
    ids=lambda c: type(c).__name__,
)
def test_one_adamw_step_moves_the_method_and_the_eval_output(encoder, batch, config):
    # issue 19 item 10 reported adapter and ia3 "do not move at all": at the PEFT level they do
    apply_peft(encoder, config)
    freeze_except_peft(encoder)
    own = dict(encoder.named_parameters())
    names = peft_parameter_names(encoder)
    assert names
    assert all(own[n].requires_grad for n in names)
    start = {n: own[n].detach().clone() for n in names}
    torch.manual_seed(1)
    head = nn.Linear(D, 3)
    labels = torch.arange(len(batch["gene_ids"])) % 3
    optimiser = torch.optim.AdamW([own[n] for n in names], lr=1e-3, weight_decay=0.0)
    before = encoder.eval().cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
    loss = nn.functional.cross_entropy(
        head(
            encoder.train().cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
        ),
        labels,
    )
    loss.backward()
    # zero-initialised factors (lora_B, adapter up) get gradient first; their partners
    # (lora_A, adapter down) only once those have moved, as in the papers
    waits = ("lora_A", "adapter.down")
    for name in names:
        grad = own[name].grad
        if any(w in name for w in waits):
            assert grad is None or torch.count_nonzero(grad) == 0, name
        else:
            assert grad is not None, name
            assert torch.count_nonzero(grad) > 0, name
    optimiser.step()
    moved = [n for n in names if not torch.equal(own[n], start[n])]
    assert moved == [n for n in names if not any(w in n for w in waits)]
    with torch.no_grad():
        after = encoder.eval().cls_embedding(
            batch["gene_ids"], batch["values"], batch["padding_mask"]
        )
    assert (after - before.detach()).abs().max() > 1e-4


# ---------------------------------------------------------------------------- registry


def test_registry_names_every_method_once_in_strategy_order():
    from scdlkit._shared.strategies import PEFT_STRATEGIES
    from scdlkit.foundation.peft import PEFT_METHODS, register_peft_method

    assert tuple(PEFT_METHODS) == PEFT_STRATEGIES
    assert [m.config_cls for m in PEFT_METHODS.values()] == [
        LoRAConfig,
        AdapterConfig,
        PrefixTuningConfig,
        IA3Config,
    ]
    assert PEFT_METHODS["ia3"].apply is apply_ia3
    with pytest.raises(ValueError, match="already registered"):
        register_peft_method(name="lora", config_cls=LoRAConfig, apply=apply_lora)
    with pytest.raises(ValueError, match="not one of the PEFT strategy names"):
        register_peft_method(name="full_finetune", config_cls=LoRAConfig, apply=apply_lora)
    with pytest.raises(ValueError, match="cannot be registered as 'lora'"):
        register_peft_method(name="lora", config_cls=IA3Config, apply=apply_lora)
    assert tuple(PEFT_METHODS) == PEFT_STRATEGIES


# ---------------------------------------------------------------------------- whole-human size


def test_lora_count_at_whole_human_size():
    args = ScGPTModelArgs()  # whole-human: d 512, 8 heads, d_hid 512, 12 layers
    with torch.device("meta"):
        encoder = ScGPTEncoder(args, n_tokens=60697, pad_id=60694)
        apply_lora(encoder, LoRAConfig())
        freeze_except_peft(encoder)
    lora = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert lora == args.nlayers * 3 * 8 * (512 + 512) == 294_912
    total = sum(p.numel() for p in encoder.parameters())
    assert total - lora == 50_278_400  # the pretrained encoder
