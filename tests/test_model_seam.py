"""The model seam carries a model that is not scGPT: a toy bag-of-genes encoder, registered in a
few lines, runs through embedding, the comparison (probe, head, LoRA, baseline), labelling,
save/load and attributions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

import scdlkit as sck
from scdlkit._shared.persist import sha256_file
from scdlkit.foundation.models import MODELS, AdaptationTargets, ModelCard, register_model

# ------------------------------------------------------------------------------ the toy model

TOY_TARGETS = AdaptationTargets(
    layers="layers",
    projections={
        "q": ("attn.query", None),
        "k": ("attn.key", None),
        "v": ("attn.value", None),
        "out_proj": ("attn.out", None),
        "linear1": ("ffn_in", None),
        "linear2": ("ffn_out", None),
    },
    attention="attn",
    attention_norm="norm",
)


class ToyAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.nhead = 1
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.prefix: nn.Module | None = None

    def forward(self, x: torch.Tensor, may_attend: torch.Tensor) -> torch.Tensor:
        q, k, v = (f(x)[:, None] for f in (self.query, self.key, self.value))
        if self.prefix is not None:
            pk, pv = self.prefix(x.shape[0])
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            may_attend = torch.cat([may_attend.new_ones(x.shape[0], pk.shape[2]), may_attend], 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=may_attend[:, None, None, :])
        return self.out(out[:, 0])


class ToyLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn, self.norm = ToyAttention(d), nn.LayerNorm(d)
        self.ffn_in, self.ffn_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, may_attend: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.attn(x, may_attend))
        return x + self.ffn_out(F.relu(self.ffn_in(x)))


class ToyEncoder(nn.Module):
    """A gene embedding scaled by log expression, one attention layer, mean over genes."""

    adaptation_targets = TOY_TARGETS
    pad_id = 0

    def __init__(self, n_tokens: int, d: int) -> None:
        super().__init__()
        self.genes = nn.Embedding(n_tokens, d, padding_idx=0)
        self.layers = nn.ModuleList([ToyLayer(d)])
        self.checkpoint = None

    d_model = property(lambda self: self.genes.embedding_dim)
    vocab_size = property(lambda self: self.genes.num_embeddings)
    head_layers = 1

    def input_embeddings(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.genes(gene_ids) * torch.log1p(values)[..., None]

    def cell_embedding_from_inputs(self, inputs: torch.Tensor, padding: torch.Tensor) -> Any:
        x = inputs
        for layer in self.layers:
            x = layer(x, ~padding)
        keep = (~padding)[..., None].to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)

    def cls_embedding(self, gene_ids: Any, values: Any, padding_mask: Any = None) -> Any:
        padding = gene_ids.eq(0) if padding_mask is None else padding_mask
        return self.cell_embedding_from_inputs(self.input_embeddings(gene_ids, values), padding)

    cell_embedding = cls_embedding

    def gene_positions(self, gene_ids: torch.Tensor, padding_mask: torch.Tensor) -> Any:
        return ~padding_mask

    def prefix_states(self, prefix_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        d = self.d_model
        return [(torch.zeros(prefix_length, d), torch.zeros(prefix_length, d))]


@dataclass
class ToyTokens:
    """Expressed genes of each cell (CSR), no truncation."""

    indptr: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    pad_id: int = 0
    pad_value: float = 0.0
    max_seq_len: int = 1000

    n_cells = property(lambda self: len(self.indptr) - 1)
    n_genes_per_cell = property(lambda self: np.diff(self.indptr))
    lengths = property(lambda self: np.maximum(np.diff(self.indptr), 1))
    nbytes = property(lambda self: self.indptr.nbytes + self.gene_ids.nbytes)

    @classmethod
    def concat(cls, parts: list[ToyTokens]) -> ToyTokens:
        starts = np.cumsum([0] + [int(p.indptr[-1]) for p in parts[:-1]])
        indptr = np.concatenate(
            [[0]] + [p.indptr[1:] + o for p, o in zip(parts, starts, strict=True)]
        )
        return cls(
            indptr.astype(np.int64),
            np.concatenate([p.gene_ids for p in parts]),
            np.concatenate([p.values for p in parts]),
        )

    def collate(self, cells: Any) -> dict[str, torch.Tensor]:
        cells = np.asarray(cells).reshape(-1)
        width = int(self.lengths[cells].max(initial=1))
        ids = np.zeros((len(cells), width), np.int64)
        vals = np.zeros((len(cells), width), np.float32)
        for row, c in enumerate(cells):
            lo, hi = self.indptr[c], self.indptr[c + 1]
            ids[row, : hi - lo], vals[row, : hi - lo] = self.gene_ids[lo:hi], self.values[lo:hi]
        ids_t = torch.from_numpy(ids)
        return {"gene_ids": ids_t, "values": torch.from_numpy(vals), "padding_mask": ids_t == 0}


@dataclass
class ToyMatch:
    names: pd.Index
    vocab_ids: np.ndarray

    n_matched = property(lambda self: int((self.vocab_ids >= 0).sum()))
    ratio = property(lambda self: self.n_matched / max(len(self.names), 1))
    matched = property(lambda self: list(self.names[self.vocab_ids >= 0]))
    unmatched = property(lambda self: list(self.names[self.vocab_ids < 0]))


@dataclass
class ToyCheckpoint:
    path: Path
    model_name = "toy"
    files = ("toy.json", "weights.pt")

    name = property(lambda self: self.path.name)
    weights_path = property(lambda self: self.path / "weights.pt")
    vocab = property(lambda self: json.loads((self.path / "toy.json").read_text())["genes"])
    readable_genes = property(lambda self: frozenset(self.vocab))
    pad_id = 0
    d_model = 16
    max_seq_len = 1000
    n_special_tokens = 0
    weights_sha256 = property(lambda self: sha256_file(self.weights_path))
    files_sha256 = property(lambda self: {f: self.file_sha256(f) for f in self.files})

    def file_sha256(self, name: str) -> str:
        return sha256_file(self.path / name)

    def config_dict(self) -> dict[str, Any]:
        return {"d_model": self.d_model}

    def resolve_options(self) -> dict[str, Any]:
        return {}


def _build(ckpt: ToyCheckpoint) -> ToyEncoder:
    encoder = ToyEncoder(len(ckpt.vocab) + 1, ckpt.d_model)
    encoder.checkpoint = ckpt
    return encoder


def _match(adata: Any, ckpt: ToyCheckpoint, gene_key: str | None) -> ToyMatch:
    names = pd.Index(adata.var[gene_key] if gene_key else adata.var_names).astype(str)
    ids = {g: i + 1 for i, g in enumerate(ckpt.vocab)}
    return ToyMatch(names, np.array([ids.get(n, -1) for n in names]))


def _tokenize(
    adata: Any, ckpt: ToyCheckpoint, *, gene_key=None, layer=None, rows=None, match=None, **_
):
    match = _match(adata, ckpt, gene_key) if match is None else match
    matrix = adata.layers[layer] if layer else adata.X
    matrix = sparse.csr_matrix(matrix[rows if rows is not None else slice(None)])
    matrix = matrix[:, np.flatnonzero(match.vocab_ids >= 0)]
    matrix.eliminate_zeros()
    ids = match.vocab_ids[match.vocab_ids >= 0][matrix.indices].astype(np.int64)
    tokens = ToyTokens(matrix.indptr.astype(np.int64), ids, matrix.data.astype(np.float32))
    return tokens, match


def _load_weights(encoder: ToyEncoder, state: dict[str, torch.Tensor]) -> str:
    encoder.load_state_dict(state)
    return f"{len(state)} keys used"


def _set_dropout(module: nn.Module, p: float) -> nn.Module:
    return module


TOY_CARD = ModelCard(
    name="toy",
    title="Toy",
    recognises=lambda folder: (folder / "toy.json").is_file(),
    resolve=lambda c, **_: c if isinstance(c, ToyCheckpoint) else ToyCheckpoint(Path(c).resolve()),
    read_weights=lambda ckpt: torch.load(ckpt.weights_path, weights_only=True),
    build=_build,
    load_weights=_load_weights,
    match_genes=_match,
    check_gene_names=lambda names, ckpt, gene_key: None,
    check_gene_overlap=lambda match, **_: None,
    tokenize=_tokenize,
    set_dropout=_set_dropout,
    set_attention_dropout=_set_dropout,
    files=ToyCheckpoint.files,
)


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ad.AnnData]:
    """A toy checkpoint folder and 240 cells of 3 types with planted marker genes."""
    register_model(TOY_CARD)
    folder = tmp_path_factory.mktemp("toy-checkpoint")
    genes = [f"G{i}" for i in range(40)]
    (folder / "toy.json").write_text(json.dumps({"genes": genes}))
    torch.manual_seed(0)
    torch.save(_build(ToyCheckpoint(folder)).state_dict(), folder / "weights.pt")
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 80)
    counts = rng.poisson(1.0, size=(240, 40)).astype(np.float32)
    for k, label in enumerate("abc"):
        counts[labels == label, k * 5 : k * 5 + 5] += rng.poisson(6.0, size=(80, 5))
    adata = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(240)]),
        var=pd.DataFrame(index=genes),
    )
    yield folder, adata
    MODELS.pop("toy", None)


def test_toy_model_is_found_from_its_folder(toy: tuple[Path, ad.AnnData]) -> None:
    folder, _ = toy
    ckpt = sck.foundation.resolve_model_checkpoint(folder)
    assert ckpt.model_name == "toy"
    assert sck.foundation.model_card(ckpt) is TOY_CARD
    with pytest.raises(ValueError, match="model='scgpt' but the checkpoint is a 'toy'"):
        sck.foundation.resolve_model_checkpoint(ckpt, model="scgpt")


def test_toy_model_embeds(toy: tuple[Path, ad.AnnData]) -> None:
    folder, adata = toy
    adata = adata.copy()
    sck.tl.embed(adata, checkpoint=folder, key_added="toy", progress=False, precision="fp32")
    emb = adata.obsm["X_toy"]
    assert emb.shape == (240, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert adata.uns["toy"]["n_genes_matched"] == 40


def test_toy_model_through_compare_label_save_load_and_markers(
    toy: tuple[Path, ad.AnnData], tmp_path: Path
) -> None:
    folder, adata = toy
    adata = adata.copy()
    strategies = ("frozen_probe", "head", "lora", "baseline")
    sck.tl.adapt_annotation(
        adata,
        "cell_type",
        checkpoint=folder,
        strategies=strategies,
        output_dir=tmp_path / "run",
        epochs=40,
        device="cpu",
        keep="all",
    )
    metrics = adata.uns["scgpt_annotation"]["strategy_metrics"]
    assert set(pd.DataFrame(metrics)["strategy"]) == set(strategies)
    runner_dir = adata.uns["scgpt_annotation"]["runner_dir"]
    manifest = json.loads((Path(runner_dir) / "manifest.json").read_text())
    assert manifest["checkpoint"]["model"] in ("toy", "")  # "" when the baseline was kept
    query = adata.copy()
    del query.obs["cell_type"]
    for strategy in strategies:
        first = sck.tl.annotate(query, runner_dir, strategy=strategy, copy=True)
        second = sck.tl.annotate(query, runner_dir, strategy=strategy, copy=True)
        assert (first.obs["scgpt_annotation"] == second.obs["scgpt_annotation"]).all()
        np.testing.assert_array_equal(
            first.obsm["scgpt_annotation_probabilities"],
            second.obsm["scgpt_annotation_probabilities"],
        )
    # the planted markers are learned by the strategies that read the toy encoder
    rows = pd.DataFrame(metrics).set_index("strategy")
    assert rows.loc["lora", "test_macro_f1"] > 0.6
    for strategy in ("lora", "baseline"):
        sck.tl.annotate(adata, runner_dir, strategy=strategy)
        sck.tl.annotation_markers(adata, key="scgpt_annotation", runner=runner_dir, n_steps=4)
        markers = adata.uns["scgpt_annotation_markers"]
        assert len(markers) > 0
