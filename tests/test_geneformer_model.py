"""The Geneformer encoder reproduces the official EmbExtractor's cell embeddings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

from scdlkit.foundation.models._contract import FoundationEncoder, ModelCheckpoint
from scdlkit.foundation.models.geneformer import (
    GENEFORMER_TARGETS,
    load_geneformer_model,
    tokenize_geneformer,
)

DATA = Path(__file__).parent / "data"
VERSIONS = ("v2", "v1")
ATOL = 1e-5


def _fixture_dir(version: str) -> Path:
    """The committed parity fixture (made with the official code; README beside the data)."""
    return DATA / f"geneformer-tiny-{version}"


@pytest.fixture(scope="module", params=VERSIONS)
def fixture(request: pytest.FixtureRequest) -> dict:
    path = _fixture_dir(request.param)
    embeddings = {}
    for file in sorted(path.glob("emb_*_layer*.npy")):
        mode, layer = re.fullmatch(r"emb_(cls|cell)_layer(-?\d)", file.stem).groups()
        embeddings[(mode, int(layer))] = np.load(file)
    return {
        "path": path,
        "model": load_geneformer_model(path / "checkpoint"),
        "expected": json.loads((path / "tokens.json").read_text()),
        "embeddings": embeddings,
    }


def _pad(cells: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in cells)
    ids = torch.zeros(len(cells), width, dtype=torch.long)
    for row, cell in enumerate(cells):
        ids[row, : len(cell)] = torch.tensor(cell)
    mask = torch.arange(width)[None, :] >= torch.tensor([len(c) for c in cells])[:, None]
    return ids, mask


def _embed_official_ids(model, input_ids, batch_size, **kwargs) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(input_ids), batch_size):
            ids, mask = _pad(input_ids[start : start + batch_size])
            out.append(model.embed(ids, mask, **kwargs))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_embeddings_of_official_tokens_match(fixture: dict, batch_size: int) -> None:
    assert fixture["embeddings"], "the fixture holds no emb_*.npy"
    for (mode, layer), reference in fixture["embeddings"].items():
        ours = _embed_official_ids(
            fixture["model"],
            fixture["expected"]["input_ids"],
            batch_size,
            mode=mode,
            emb_layer=layer,
        )
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, rtol=0, atol=ATOL, err_msg=f"{mode} {layer}")


def test_default_cell_embedding_is_upstreams_default(fixture: dict) -> None:
    model = fixture["model"]
    default = ("cls", -1) if model.version == "V2" else ("cell", -1)
    ids, mask = _pad(fixture["expected"]["input_ids"])
    with torch.inference_mode():
        ours = model.cell_embedding(ids, torch.zeros(ids.shape), mask).numpy()
    np.testing.assert_allclose(ours, fixture["embeddings"][default], rtol=0, atol=ATOL)


def test_end_to_end_exact_for_tie_free_cells(fixture: dict) -> None:
    model = fixture["model"]
    adata = ad.read_h5ad(fixture["path"] / "data.h5ad")
    tokens, _ = tokenize_geneformer(adata, model.checkpoint, gene_key="ensembl_id")
    tie_free = [i for i, runs in enumerate(fixture["expected"]["tie_runs"]) if not runs]
    batch = tokens.collate(tie_free)
    for (mode, layer), reference in fixture["embeddings"].items():
        with torch.inference_mode():
            ours = model.embed(batch["gene_ids"], batch["padding_mask"], mode=mode, emb_layer=layer)
        np.testing.assert_allclose(ours.numpy(), reference[tie_free], rtol=0, atol=ATOL)


def test_hidden_states_and_partial_forward_agree(fixture: dict) -> None:
    model = fixture["model"]
    ids, mask = _pad(fixture["expected"]["input_ids"][:6])
    with torch.inference_mode():
        states = model.hidden_states(ids, mask)
        assert len(states) == model.n_layers + 1
        for i, state in enumerate(states):
            torch.testing.assert_close(model(ids, None, mask, layer=i), state)
            first = model(ids, None, mask, layer=i, first_only=True)
            torch.testing.assert_close(first, state[:, :1])
        torch.testing.assert_close(model(ids, None, mask), states[-1])
    with pytest.raises(ValueError, match="hidden-state index"):
        model(ids, None, mask, layer=model.n_layers + 1)


def test_mode_and_layer_checks(fixture: dict) -> None:
    model = fixture["model"]
    ids, mask = _pad(fixture["expected"]["input_ids"][:2])
    with pytest.raises(ValueError, match="emb_layer=1"):
        model.embed(ids, mask, emb_layer=1)
    with pytest.raises(ValueError, match="mode='mean'"):
        model.embed(ids, mask, mode="mean")
    if model.version == "V1":
        with pytest.raises(ValueError, match="lacks"):
            model.embed(ids, mask, mode="cls")
    else:
        with pytest.raises(ValueError, match="must start with <cls>"):
            model.embed(ids[:, 1:], mask[:, 1:], mode="cls")


def test_a_row_of_padding_does_not_spread_nan(fixture: dict) -> None:
    model = fixture["model"]
    cells = fixture["expected"]["input_ids"][:3]
    ids, mask = _pad(cells)
    ids = torch.cat([ids, torch.zeros(1, ids.shape[1], dtype=torch.long)])
    mask = torch.cat([mask, torch.ones(1, mask.shape[1], dtype=torch.bool)])
    with torch.inference_mode():
        hidden = model(ids, None, mask)
        cell = model.embed(ids, mask, mode="cell")
    assert torch.isfinite(hidden).all()
    assert torch.isfinite(cell[:3]).all()
    # a cell without gene tokens has no mean: zero, not 0/0 (NaN would break every strategy)
    assert (cell[3] == 0).all()


def test_too_long_input_is_refused(fixture: dict) -> None:
    model = fixture["model"]
    length = model.config.max_position_embeddings + 1
    with pytest.raises(ValueError, match="more than the model's"):
        model(torch.full((1, length), 5, dtype=torch.long))


class _Prefix(nn.Module):
    def __init__(self, heads: int, length: int, head_dim: int) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, heads, length, head_dim))
        self.values = nn.Parameter(torch.randn(1, heads, length, head_dim))

    def forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.expand(batch, -1, -1, -1), self.values.expand(batch, -1, -1, -1)


def test_prefix_slot_changes_outputs(v2_model) -> None:
    model, cells = v2_model
    ids, mask = _pad(cells)
    attention = model.encoder.layer[0].attention.self
    assert attention.prefix is None
    with torch.inference_mode():
        before = model.cell_embedding(ids, None, mask)
        torch.manual_seed(0)
        attention.prefix = _Prefix(attention.nhead, 3, attention.head_dim)
        try:
            with_prefix = model.cell_embedding(ids, None, mask)
            unpadded = model.cell_embedding(ids[:1, : len(cells[0])], None, None)
        finally:
            attention.prefix = None
        after = model.cell_embedding(ids, None, mask)
    assert (with_prefix - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before)
    # the prefix is attended whatever the padding: the first cell alone gives the same output
    torch.testing.assert_close(unpadded[0], with_prefix[0], rtol=0, atol=ATOL)


@pytest.fixture
def v2_model() -> tuple:
    path = _fixture_dir("v2")
    expected = json.loads((path / "tokens.json").read_text())
    return load_geneformer_model(path / "checkpoint"), expected["input_ids"][:5]


def test_dropout_only_in_training(v2_model) -> None:
    model, cells = v2_model
    ids, mask = _pad(cells)
    with torch.no_grad():
        first, second = model(ids, None, mask), model(ids, None, mask)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        model.train()
        assert not torch.equal(model(ids, None, mask), model(ids, None, mask))
        model.set_dropout(0.0)
        torch.testing.assert_close(model(ids, None, mask), first, rtol=0, atol=ATOL)
        model.set_dropout(0.3)
        probabilities = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
        assert probabilities == {0.3}
        assert {layer.attention.self.dropout for layer in model.encoder.layer} == {0.3}
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        model.set_dropout(1.0)


def test_adaptation_targets_name_linear_layers(v2_model) -> None:
    model, _ = v2_model
    assert model.adaptation_targets is GENEFORMER_TARGETS
    for layer in model.get_submodule(GENEFORMER_TARGETS.layers):
        for path, _block in GENEFORMER_TARGETS.projections.values():
            assert isinstance(layer.get_submodule(path), nn.Linear)
        assert layer.get_submodule(GENEFORMER_TARGETS.attention).prefix is None
        assert isinstance(layer.get_submodule(GENEFORMER_TARGETS.attention_norm), nn.LayerNorm)
    states = model.prefix_states(4)
    assert len(states) == model.n_layers
    assert all(k.shape == v.shape == (4, model.d_model) for k, v in states)
    assert model.pad_id == 0
    assert model.d_model == 32


def test_model_contract(fixture: dict) -> None:
    model = fixture["model"]
    ckpt = model.checkpoint
    assert isinstance(model, FoundationEncoder)
    assert isinstance(ckpt, ModelCheckpoint)
    assert model.vocab_size == ckpt.config.vocab_size == ckpt.dictionaries.n_tokens
    assert ckpt.n_special_tokens == (2 if model.version == "V2" else 0)
    assert ckpt.max_seq_len == ckpt.model_input_size
    assert ckpt.d_model == model.d_model
    assert ckpt.config_dict()["version"] == model.version
    assert set(ckpt.files_sha256) == set(ckpt.files)
    assert ckpt.files[0] == "config.json"
    assert ckpt.files[-1] == "model.safetensors"
    with pytest.raises(ValueError, match="not a checkpoint file"):
        ckpt.file_sha256("training_args.bin")
    assert "<pad>" not in ckpt.readable_genes
    assert len(ckpt.readable_genes) == ckpt.dictionaries.n_tokens - 2 * (
        1 + (model.version == "V2")
    )
    cells = fixture["expected"]["input_ids"][:6]
    ids, mask = _pad(cells)
    genes = model.gene_positions(ids, mask)
    n_special = ckpt.n_special_tokens
    assert genes.sum(dim=1).tolist() == [len(c) - n_special for c in cells]
    with torch.inference_mode():
        direct = model.cls_embedding(ids, torch.zeros(ids.shape), mask)
        via_inputs = model.cell_embedding_from_inputs(model.input_embeddings(ids, None), mask)
    torch.testing.assert_close(via_inputs, direct)
    # classifiers read the last layer (as upstream's BertForSequenceClassification); tl.embed
    # writes upstream's EmbExtractor default, the second-to-last
    with torch.inference_mode():
        last = model.cls_embedding(ids, None, mask).numpy()
        default = model.cell_embedding(ids, None, mask).numpy()
    mode = "cls" if model.version == "V2" else "cell"
    np.testing.assert_allclose(last, fixture["embeddings"][(mode, 0)][:6], rtol=0, atol=ATOL)
    np.testing.assert_allclose(default, fixture["embeddings"][(mode, -1)][:6], rtol=0, atol=ATOL)
