"""The speed-ups keep results: bf16 weight copy, packed linears, bucketed batch shapes.

Speed itself is measured in ``benchmarks/`` (never in timed tests); these tests check that the
fast paths compute what the plain ones do, are used when they should be and only then, and keep
the number of distinct batch shapes bounded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata
from scdlkit.foundation._embed import (
    MIN_BATCH_TOKENS,
    WIDTH_MULTIPLE,
    encode_cells,
    inference_batches,
    pad_batch,
    padded_width,
)
from scdlkit.foundation.models.scgpt import _model
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens


@pytest.fixture
def encoder(checkpoint_dir):
    return load_scgpt_model(checkpoint_dir, device="cpu")


@pytest.fixture
def tokens(fixture_adata, checkpoint_dir):
    return tokenize_adata(fixture_adata, resolve_checkpoint(checkpoint_dir), seed=0)[0]


def _cls(encoder, tokens, precision: str) -> np.ndarray:
    return encode_cells(
        tokens,
        lambda b: encoder.cls_embedding(b["gene_ids"], b["values"], b["padding_mask"]),
        device=torch.device("cpu"),
        batch_size=16,
        precision=precision,
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bf16_inference_uses_one_cached_copy_and_agrees_with_fp32(encoder, tokens, expected):
    keys = list(encoder.state_dict())
    fp32 = _cls(encoder, tokens, "fp32")
    assert encoder not in _model._INFERENCE_COPIES  # fp32 never makes a copy
    np.testing.assert_allclose(fp32, expected["cls_raw"], rtol=1e-4, atol=1e-5)

    bf16 = _cls(encoder, tokens, "bf16")
    copy = _model._INFERENCE_COPIES[encoder][1]
    assert _cosine(bf16, fp32).min() > 0.9999
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert _cls(encoder, tokens, "bf16") is not None
    assert _model._INFERENCE_COPIES[encoder][1] is copy  # made once, reused
    assert list(encoder.state_dict()) == keys  # the copy is never part of the checkpoint
    assert all(p.dtype == torch.float32 for p in encoder.parameters())


def test_bf16_copy_matches_plain_autocast(encoder, tokens, monkeypatch):
    copied = _cls(encoder, tokens, "bf16")
    monkeypatch.setattr(_model, "_bf16_inference", lambda *_: False)
    autocast = _cls(encoder, tokens, "bf16")
    assert encoder in _model._INFERENCE_COPIES
    assert _cosine(copied, autocast).min() > 0.9999


def test_bf16_copy_follows_weight_changes_and_training(encoder, tokens):
    before = _cls(encoder, tokens, "bf16")
    first = _model._INFERENCE_COPIES[encoder][1]
    weight = encoder.transformer_encoder.layers[0].linear2.weight
    with torch.no_grad():  # in place, as an optimiser step changes weights
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    fp32 = _cls(encoder, tokens, "fp32")
    after = _cls(encoder, tokens, "bf16")
    assert _model._INFERENCE_COPIES[encoder][1] is not first
    assert _cosine(after, fp32).min() > 0.9999
    assert _cosine(after, before).min() < 0.999  # the change is seen, not the stale copy

    encoder.train()
    assert encoder not in _model._INFERENCE_COPIES
    batch = collate_tokens(tokens, range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder.cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert out.requires_grad  # training under autocast runs the real weights
    assert encoder not in _model._INFERENCE_COPIES


def test_bf16_copy_keeps_adaptation_modules(encoder, tokens):
    from scdlkit.foundation.peft import LoRAConfig, apply_lora

    plain = _cls(encoder, tokens, "fp32")
    apply_lora(encoder, LoRAConfig(rank=4))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    adapted = _cls(encoder, tokens, "fp32")
    assert _cosine(adapted, plain).min() < 0.999  # the LoRA update matters...
    bf16 = _cls(encoder, tokens, "bf16")
    assert _cosine(bf16, adapted).min() > 0.999  # ...and the bf16 copy applies it
    copy = _model._INFERENCE_COPIES[encoder][1]
    assert any("lora_A" in name for name, _ in copy.named_parameters())


@pytest.mark.skipif(not _model._packing_works(), reason="no native bf16 oneDNN on this CPU")
def test_packed_linear_matches_linear():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(3, 7, 64, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        got = _model.PackedLinear(linear)(x).float()
        want = F.linear(x.float(), linear.weight.bfloat16().float(), linear.bias.bfloat16().float())
        fused = _model.PackedLinear(linear)(x, relu=True).float()
    assert got.shape == (3, 7, 96)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, F.relu(got))


def test_inference_batches_shapes_come_from_small_fixed_sets():
    rng = np.random.default_rng(0)
    batch_size = 64
    allowed = {batch_size, 1, 2, 4, 8, 16, 32}
    shapes = set()
    for chunk in range(30):  # 30 chunks of 2,000 cells, as a long stream would bring
        lengths = np.minimum(rng.lognormal(np.log(700), 0.5, 2000).astype(int) + 1, 1200)
        seen = []
        for positions in inference_batches(lengths, batch_size):
            width = padded_width(int(lengths[positions].max()))
            assert width % WIDTH_MULTIPLE == 0
            assert len(positions) in allowed
            # a cell under 90% of the width joins only to fill a batch to MIN_BATCH_TOKENS
            similar = int((lengths[positions] >= np.ceil(0.9 * width)).sum())
            assert similar == len(positions) or len(positions) <= -(-MIN_BATCH_TOKENS // width)
            shapes.add((len(positions), width))
            seen.append(positions)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(2000))
        if chunk == 4:
            after_five = len(shapes)
    assert len(shapes) <= len(allowed) * (1216 // WIDTH_MULTIPLE)
    assert len(shapes) - after_five <= 10  # later chunks bring (almost) nothing new


def test_inference_batches_small_inputs_and_bad_batch_size():
    assert [list(b) for b in inference_batches(np.array([5]), 64)] == [[0]]
    assert list(inference_batches(np.array([], dtype=int), 64)) == []
    batches = list(inference_batches(np.array([300, 10, 290, 20, 280]), 3))
    assert sorted(np.concatenate(batches)) == [0, 1, 2, 3, 4]
    assert all(len(b) in (1, 2, 3) for b in batches)
    with pytest.raises(ValueError, match="batch_size"):
        next(inference_batches(np.array([5, 6]), 0))


def test_padding_to_the_bucket_width_changes_nothing_in_fp32(encoder, tokens):
    batch = collate_tokens(tokens, range(6))
    width = batch["gene_ids"].shape[1]
    padded = pad_batch(batch, width + 37, pad_id=tokens.pad_id, pad_value=tokens.pad_value)
    assert padded["gene_ids"].shape == (6, width + 37)
    assert padded["padding_mask"][:, width:].all()
    assert (padded["gene_ids"][:, width:] == tokens.pad_id).all()
    assert pad_batch(batch, width, pad_id=tokens.pad_id, pad_value=tokens.pad_value) is batch
    with torch.inference_mode():
        a = encoder.cls_embedding(batch["gene_ids"], batch["values"], batch["padding_mask"])
        b = encoder.cls_embedding(padded["gene_ids"], padded["values"], padded["padding_mask"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
