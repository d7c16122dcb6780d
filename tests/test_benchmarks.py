"""Smoke tests of the benchmark scripts and their synthetic-data helpers (tiny models, seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

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
def synthetic() -> ModuleType:
    return _import("_synthetic")


def test_random_checkpoint_loads_like_an_official_one(tmp_path, synthetic):
    from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata

    folder = synthetic.write_random_checkpoint(
        tmp_path / "ckpt", embsize=16, nheads=2, d_hid=32, nlayers=2, n_vocab_genes=500
    )
    with (folder / "vocab.json").open() as fh:
        vocab = json.load(fh)
    assert len(vocab) == 503
    assert [vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [500, 501, 502]
    state = torch.load(folder / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" in state

    model = load_scgpt_model(folder, device="cpu")
    assert "flag_encoder.weight" in model.load_report.ignored
    assert not model.load_report.renamed  # already in the official flash-attn layout

    genes = synthetic.fake_gene_symbols(300)
    adata = synthetic.synthetic_adata(40, genes, min_expressed=20, max_expressed=250, seed=1)
    n_expressed = np.diff(adata.X.indptr)
    assert n_expressed.min() >= 20
    assert n_expressed.max() <= 250
    assert (adata.X.data >= 1).all()
    assert list(adata.var_names) == genes
    tokens, match = tokenize_adata(adata, resolve_checkpoint(folder))
    assert match.n_matched == 300
    np.testing.assert_array_equal(tokens.n_genes_per_cell, n_expressed)


def test_embed_throughput_quick_table(capsys):
    bench = _import("embed_throughput")
    text = bench.main(["--quick", "--mfu", "--device", "cpu"])
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert float(row["sck.tl.embed cells/s"]) > 0
    assert float(row["upstream way cells/s"]) > 0
    assert row["speed-up"].endswith("x")
    assert float(row["agreement (min cosine)"]) > 0.999
    assert float(row["token bytes / non-zero"]) <= 8
    mfu_header = next(line for line in lines[3:] if line.startswith("| device | precision"))
    assert [c.strip() for c in mfu_header.strip("|").split("|")] == list(bench.MFU_COLUMNS)


def test_scale_table_and_backed_file(tmp_path, capsys):
    import anndata as ad

    bench = _import("scale")
    args = ["--n-cells", "240", "--bf16-cells", "60", "--chunk-size", "100"]
    assert bench.main([*args, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny fixture")]
    assert [row.split("|")[2:4] for row in rows] == [[" fp32 ", " 240 "], [" bf16 ", " 60 "]]
    for row in rows:
        cells_per_s, rss = (c.strip() for c in row.strip("|").split("|")[3:5])
        assert float(cells_per_s) > 0
        assert 0 < float(rss.removesuffix(" GiB")) < 4
    backed = ad.read_h5ad(tmp_path / "synthetic_240.h5ad", backed="r")
    assert backed.n_obs == 240
    nnz = np.diff(backed.X[:].indptr)
    assert nnz.min() >= 200
    assert nnz.max() <= 2000
    backed.file.close()
    sample = ad.read_h5ad(tmp_path / "synthetic_60.h5ad", backed="r")
    assert sample.n_obs == 60
    sample.file.close()
