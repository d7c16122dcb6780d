"""Synthetic scGPT checkpoints and AnnData for benchmarks (no download, no real weights).

A checkpoint written here has the official folder layout (``args.json``, ``vocab.json``,
``best_model.pt``) and the official state-dict key names, flash-attn ``self_attn.Wqkv.*``
included (SCGPT_NOTES.md sections 1-2), with random weights. Throughput does not depend on weight
values, so a random whole-human-sized model times exactly like the real one.

Benchmarks import this file by path (``benchmarks/`` is not a package)::

    spec = importlib.util.spec_from_file_location("_synthetic", "benchmarks/_synthetic.py")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

__all__ = [
    "SPECIAL_TOKENS",
    "WHOLE_HUMAN",
    "fake_gene_symbols",
    "random_state_dict",
    "synthetic_adata",
    "write_random_checkpoint",
]

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

#: Architecture of the official whole-human checkpoint (vocab 60,694 genes + 3 specials).
WHOLE_HUMAN = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12, "n_vocab_genes": 60694}


def fake_gene_symbols(n: int) -> list[str]:
    """``n`` distinct, deterministic gene-symbol-like names (``SYN00000``, ``SYN00001``, ...)."""
    return [f"SYN{i:05d}" for i in range(n)]


def _args_json(embsize: int, nheads: int, d_hid: int, nlayers: int, max_seq_len: int) -> dict:
    # The fields of the official whole-human args.json that matter for inference, plus a few
    # training-only fields so the file looks like the real one.
    return {
        "data_source": "synthetic",
        "pad_token": "<pad>",
        "input_style": "binned",
        "input_emb_style": "continuous",
        "n_bins": 51,
        "max_seq_len": max_seq_len,
        "mask_ratio": [0.25, 0.5, 0.75],
        "batch_size": 32,
        "eval_batch_size": 64,
        "fp16": True,
        "fast_transformer": True,
        "nlayers": nlayers,
        "nheads": nheads,
        "embsize": embsize,
        "d_hid": d_hid,
        "dropout": 0.2,
        "n_layers_cls": 3,
        "mask_value": -1,
        "pad_value": -2,
        "MVC": True,
    }


def random_state_dict(
    *, embsize: int, d_hid: int, nlayers: int, n_tokens: int, pad_id: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random fp32 state dict with the official key names and shapes.

    Holds the encoder (flash-attn ``Wqkv`` layout) and the pretraining heads a real checkpoint
    carries (``decoder.*``, ``mvc_decoder.*``, ``flag_encoder.weight``). Linear weights are
    scaled ``N(0, 1/fan_in)`` so activations stay in a realistic range; LayerNorms are identity.
    """
    gen = torch.Generator().manual_seed(seed)
    d = embsize

    def linear(prefix: str, out_f: int, in_f: int, *, bias: bool = True) -> dict[str, torch.Tensor]:
        w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
        out = {f"{prefix}.weight": w}
        if bias:
            out[f"{prefix}.bias"] = torch.randn(out_f, generator=gen) * 0.02
        return out

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.ones(d), f"{prefix}.bias": torch.zeros(d)}

    emb = torch.randn(n_tokens, d, generator=gen)
    emb[pad_id] = 0.0  # nn.Embedding(padding_idx=pad_id) keeps that row at zero
    state: dict[str, torch.Tensor] = {"encoder.embedding.weight": emb, **norm("encoder.enc_norm")}
    state |= linear("value_encoder.linear1", d, 1)
    state |= linear("value_encoder.linear2", d, d)
    state |= norm("value_encoder.norm")
    for i in range(nlayers):
        p = f"transformer_encoder.layers.{i}"
        state |= linear(f"{p}.self_attn.Wqkv", 3 * d, d)
        state |= linear(f"{p}.self_attn.out_proj", d, d)
        state |= linear(f"{p}.linear1", d_hid, d)
        state |= linear(f"{p}.linear2", d, d_hid)
        state |= norm(f"{p}.norm1") | norm(f"{p}.norm2")
    # pretraining heads: present in official files, ignored by the encoder
    state |= linear("decoder.fc.0", d, d) | linear("decoder.fc.2", d, d)
    state |= linear("decoder.fc.4", 1, d)
    state |= linear("mvc_decoder.gene2query", d, d)
    state |= linear("mvc_decoder.W", d, d, bias=False)
    state["flag_encoder.weight"] = torch.randn(2, d, generator=gen)
    return {k: v.contiguous().float() for k, v in state.items()}


def write_random_checkpoint(
    folder: str | os.PathLike,
    *,
    embsize: int = 512,
    nheads: int = 8,
    d_hid: int = 512,
    nlayers: int = 12,
    n_vocab_genes: int = 60694,
    max_seq_len: int = 1200,
    seed: int = 0,
) -> Path:
    """Write an official-layout scGPT checkpoint folder with random weights; return its path.

    The defaults are the whole-human architecture (about 51 M parameters, about 200 MiB on disk).
    ``vocab.json`` holds :func:`fake_gene_symbols` ``(n_vocab_genes)`` then ``<pad>``, ``<cls>``,
    ``<eoc>``, its keys written in a shuffled order as upstream's hash-ordered files are.
    ``max_seq_len`` (official: 1200) goes to ``args.json``; smaller values make smoke tests fast.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [*fake_gene_symbols(n_vocab_genes), *SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(tokens)}
    order = np.random.default_rng(seed).permutation(len(tokens))
    with (folder / "vocab.json").open("w") as fh:
        json.dump({tokens[i]: int(i) for i in order}, fh)
    with (folder / "args.json").open("w") as fh:
        json.dump(_args_json(embsize, nheads, d_hid, nlayers, max_seq_len), fh, indent=4)
    state = random_state_dict(
        embsize=embsize,
        d_hid=d_hid,
        nlayers=nlayers,
        n_tokens=len(tokens),
        pad_id=vocab["<pad>"],
        seed=seed,
    )
    torch.save(state, folder / "best_model.pt")
    return folder


def synthetic_adata(
    n_cells: int,
    genes: Sequence[str],
    *,
    min_expressed: int = 200,
    max_expressed: int = 2000,
    median_expressed: float | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Sparse raw counts with realistic per-cell numbers of expressed genes.

    Each cell expresses a log-normal number of genes (median ``median_expressed``, default the
    geometric mean of the bounds; clipped to ``[min_expressed, max_expressed]`` and to
    ``len(genes)``). Which genes is drawn without replacement with Zipf-like gene popularity,
    and each count is ``1 + Poisson(gene mean)`` with log-normal gene means, so integer ties are
    as common as in real UMI data. ``var_names`` are ``genes``.
    """
    rng = np.random.default_rng(seed)
    genes = pd.Index(list(genes), dtype=str)
    n_genes = len(genes)
    lo, hi = min(min_expressed, n_genes), min(max_expressed, n_genes)
    median = median_expressed if median_expressed is not None else np.sqrt(max(lo, 1) * hi)
    n_expr = np.clip(np.round(rng.lognormal(np.log(median), 0.5, n_cells)), lo, hi).astype(int)
    popularity = 1.0 / np.arange(1, n_genes + 1) ** 0.8
    popularity = popularity[rng.permutation(n_genes)]
    gene_mean = rng.lognormal(0.0, 1.0, n_genes)

    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(n_expr, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for c in range(n_cells):
        k = n_expr[c]
        if k == 0:
            continue
        # weighted sampling without replacement: the k smallest of Exp(1) / weight
        keys = rng.exponential(size=n_genes) / popularity
        chosen = np.sort(np.argpartition(keys, k - 1)[:k]) if k < n_genes else np.arange(n_genes)
        size = rng.lognormal(0.0, 0.3)
        indices[indptr[c] : indptr[c + 1]] = chosen
        data[indptr[c] : indptr[c + 1]] = 1 + rng.poisson(gene_mean[chosen] * size)
    x = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)], dtype=str))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
