from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scdlkit as sck
from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata
from scdlkit.foundation.models.scgpt._tokenize import collate_tokens


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embed_reproduces_upstream(fixture_adata, checkpoint_dir, expected):
    sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, progress=False, batch_size=16)
    emb = fixture_adata.obsm["X_scgpt"]
    assert emb.dtype == np.float32
    assert emb.shape == expected["cls_embedding"].shape
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert _cosine(emb, expected["cls_embedding"]).min() > 0.9999
    params = fixture_adata.uns["scgpt"]["params"]
    assert params["batch_size"] == 16
    assert params["checkpoint_path"] == str(checkpoint_dir.resolve())


def test_tokens_match_upstream(fixture_adata, checkpoint_dir, expected):
    ckpt = resolve_checkpoint(checkpoint_dir)
    tokens, match = tokenize_adata(fixture_adata, ckpt)
    assert match.n_matched == 350
    np.testing.assert_array_equal(tokens.lengths, expected["lengths"])
    for i in range(tokens.n_cells):
        batch = collate_tokens(tokens, [i])
        ours = dict(zip(batch["gene_ids"][0].tolist(), batch["values"][0].tolist(), strict=True))
        n = expected["lengths"][i]
        theirs = dict(
            zip(
                expected["gene_ids"][i, :n].tolist(),
                expected["values"][i, :n].tolist(),
                strict=True,
            )
        )
        assert ours == theirs
    # compact storage: int32 gene id + uint8 bin per non-zero gene
    per_nonzero = (tokens.gene_ids.nbytes + tokens.bins.nbytes) / len(tokens.gene_ids)
    assert per_nonzero == 5


def test_raw_cls_matches_upstream(fixture_adata, checkpoint_dir, expected):
    model = load_scgpt_model(checkpoint_dir, device="cpu")
    batch = {
        "gene_ids": torch.as_tensor(expected["gene_ids"]).long(),
        "values": torch.as_tensor(expected["values"]).float(),
    }
    with torch.inference_mode():
        cls = model.cls_embedding(batch["gene_ids"], batch["values"]).numpy()
    np.testing.assert_allclose(cls, expected["cls_raw"], atol=1e-4, rtol=1e-4)


def test_load_report(checkpoint_dir):
    model = load_scgpt_model(checkpoint_dir, device="cpu")
    report = model.load_report
    assert "flag_encoder.weight" in report.ignored
    assert any(k.startswith("decoder.") for k in report.ignored)
    assert any(k.startswith("mvc_decoder.") for k in report.ignored)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in report.used
    assert not model.training


def _rewrite_layout(src: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in src.items():
        if layout == "in_proj":
            key = key.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight")
            key = key.replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias")
        elif layout == "impl":
            key = key.replace("self_attn.Wqkv.", "self_attn._impl.Wqkv.")
            key = key.replace("self_attn.out_proj.", "self_attn._impl.out_proj.")
        out[key] = value
    return out


@pytest.mark.parametrize("layout", ["in_proj", "impl"])
def test_other_attention_layouts_load_identically(layout, checkpoint_copy, fixture_adata, expected):
    path = checkpoint_copy / "best_model.pt"
    state = torch.load(path, weights_only=True)
    rewritten = _rewrite_layout(state, layout)
    assert rewritten.keys() != state.keys()
    torch.save(rewritten, path)
    model = load_scgpt_model(checkpoint_copy, device="cpu")
    assert len(model.load_report.renamed) == (4 if layout == "in_proj" else 8)
    sck.tl.embed(fixture_adata, checkpoint=checkpoint_copy, progress=False)
    assert _cosine(fixture_adata.obsm["X_scgpt"], expected["cls_embedding"]).min() > 0.9999


def test_missing_encoder_key_is_named(checkpoint_copy):
    path = checkpoint_copy / "best_model.pt"
    state = torch.load(path, weights_only=True)
    del state["transformer_encoder.layers.1.self_attn.out_proj.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.out_proj\.weight"):
        load_scgpt_model(checkpoint_copy, device="cpu")


def test_misshaped_encoder_key_is_named(checkpoint_copy):
    path = checkpoint_copy / "best_model.pt"
    state = torch.load(path, weights_only=True)
    state["value_encoder.linear2.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"value_encoder\.linear2\.weight.*shape"):
        load_scgpt_model(checkpoint_copy, device="cpu")


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_object_is_refused(checkpoint_copy, capsys):
    path = checkpoint_copy / "best_model.pt"
    state = torch.load(path, weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_scgpt_model(checkpoint_copy, device="cpu")
    assert "pwned" not in capsys.readouterr().out


def test_vocab_specials_appended(checkpoint_copy):
    import json

    vocab_path = checkpoint_copy / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    for special in ("<pad>", "<cls>", "<eoc>"):
        vocab.pop(special)
    vocab_path.write_text(json.dumps(vocab))
    ckpt = resolve_checkpoint(checkpoint_copy)
    assert ckpt.vocab["<pad>"] == 5000
    assert ckpt.vocab["<cls>"] == 5001
    assert ckpt.vocab["<eoc>"] == 5002
    load_scgpt_model(ckpt, device="cpu")


def test_missing_official_checkpoint_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDLKIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint("whole-human")
    text = str(info.value)
    assert str(tmp_path / "scgpt" / "whole-human") in text
    assert "drive.google.com" in text
    assert "best_model.pt" in text


def test_official_name_found_in_cache(tmp_path, monkeypatch, checkpoint_dir):
    import shutil

    shutil.copytree(checkpoint_dir, tmp_path / "scgpt" / "blood")
    monkeypatch.setenv("SCDLKIT_CACHE_DIR", str(tmp_path))
    ckpt = resolve_checkpoint("blood")
    assert ckpt.name == "blood"
    assert ckpt.args.embsize == 32


def test_scaled_x_points_to_raw(checkpoint_dir):
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    before = pbmc.copy()
    with pytest.raises(ValueError, match=r"negative.*adata\.raw\.to_adata\(\)"):
        sck.tl.embed(pbmc, checkpoint=checkpoint_dir, progress=False)
    assert "X_scgpt" not in pbmc.obsm
    assert set(pbmc.uns) == set(before.uns)


def test_non_finite_values_refused(fixture_adata, checkpoint_dir):
    fixture_adata.X[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, progress=False)
    assert "scgpt" not in fixture_adata.uns


@pytest.mark.parametrize("storage", ["dense", "csr", "csc", "backed"])
@pytest.mark.parametrize("bad", [-1.0, np.inf])
def test_bad_values_refused_in_every_storage(fixture_adata, checkpoint_dir, tmp_path, storage, bad):
    from scipy import sparse

    from scdlkit._shared import validation

    x = np.asarray(
        fixture_adata.X.toarray() if sparse.issparse(fixture_adata.X) else fixture_adata.X
    )
    x = x.astype(np.float32)
    x[-1, np.flatnonzero(x[-1])[-1]] = bad  # the last stored value: the scan reaches the end
    adata = ad.AnnData(x, var=fixture_adata.var.copy())
    if storage != "dense":
        adata.X = sparse.csr_matrix(x) if storage != "csc" else sparse.csc_matrix(x)
    if storage == "backed":
        adata.write_h5ad(tmp_path / "bad.h5ad")
        adata = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    match = "negative" if bad < 0 else "NaN or infinite"
    with pytest.raises(ValueError, match=match):
        validation.validate_values(adata, None)
    # and in blocks smaller than the data, as a large file is scanned
    blocks = list(validation._stored_values(validation.get_matrix(adata, None), size=7))
    assert sum(len(b) for b in blocks) == np.count_nonzero(x)
    assert not np.isfinite(np.concatenate(blocks)).all() or np.concatenate(blocks).min() < 0


def test_no_gene_overlap(fixture_adata, checkpoint_dir):
    fixture_adata.var_names = [f"NOTAGENE{i}" for i in range(fixture_adata.n_vars)]
    with pytest.raises(ValueError, match="gene_key"):
        sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, progress=False)
    assert "X_scgpt" not in fixture_adata.obsm


def test_ensembl_ids_need_gene_key(fixture_adata, checkpoint_dir, expected):
    symbols = fixture_adata.var_names.copy()
    fixture_adata.var["symbol"] = symbols
    fixture_adata.var_names = [f"ENSG{i:011d}" for i in range(fixture_adata.n_vars)]
    with pytest.raises(ValueError, match=r"Ensembl.*gene_key"):
        sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, progress=False)
    assert "X_scgpt" not in fixture_adata.obsm
    out = sck.tl.embed(
        fixture_adata, checkpoint=checkpoint_dir, gene_key="symbol", progress=False, copy=True
    )
    assert "X_scgpt" not in fixture_adata.obsm
    assert _cosine(out.obsm["X_scgpt"], expected["cls_embedding"]).min() > 0.9999


def test_layer_and_sparse_input(fixture_adata, checkpoint_dir, expected):
    from scipy import sparse

    fixture_adata.layers["counts"] = sparse.csr_matrix(fixture_adata.X)
    fixture_adata.X = np.zeros_like(fixture_adata.X)
    sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, layer="counts", progress=False)
    assert _cosine(fixture_adata.obsm["X_scgpt"], expected["cls_embedding"]).min() > 0.9999


def test_precision_resolution(monkeypatch):
    from scdlkit._shared import hardware as _hardware
    from scdlkit.foundation import _device

    monkeypatch.delenv(_hardware.NATIVE_BF16_ENV, raising=False)
    cpu = torch.device("cpu")
    assert _device.resolve_precision("fp32", cpu) == "fp32"
    assert _device.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert _device.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(_hardware, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert _device.resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        _device.resolve_precision("fp16", cpu)


def test_bf16_embedding_agrees_with_fp32(fixture_adata, checkpoint_dir, expected):
    out = sck.tl.embed(
        fixture_adata, checkpoint=checkpoint_dir, precision="bf16", progress=False, copy=True
    )
    assert out.uns["scgpt"]["params"]["precision_used"] == "bf16"
    assert _cosine(out.obsm["X_scgpt"], expected["cls_embedding"]).min() > 0.999


def test_backed_and_chunked_embedding_match_in_memory(fixture_adata, checkpoint_dir, tmp_path):
    from scipy import sparse

    fixture_adata.X = sparse.csr_matrix(fixture_adata.X)
    fp32 = {"checkpoint": checkpoint_dir, "precision": "fp32", "progress": False}
    in_memory = sck.tl.embed(fixture_adata, **fp32, copy=True)
    path = tmp_path / "cells.h5ad"
    fixture_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    sck.tl.embed(backed, **fp32, chunk_size=7)
    np.testing.assert_allclose(
        backed.obsm["X_scgpt"], in_memory.obsm["X_scgpt"], rtol=1e-5, atol=1e-6
    )
    backed.file.close()


def test_backed_results_saved_with_write_in_r_plus_mode(fixture_adata, checkpoint_dir, tmp_path):
    from scipy import sparse

    fixture_adata.X = sparse.csr_matrix(fixture_adata.X)
    fp32 = {"checkpoint": checkpoint_dir, "precision": "fp32", "progress": False}
    in_memory = sck.tl.embed(fixture_adata, **fp32, copy=True)
    path = tmp_path / "cells.h5ad"
    fixture_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r+")
    sck.tl.embed(backed, **fp32, chunk_size=10)
    backed.write()
    backed.file.close()
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(
        back.obsm["X_scgpt"], in_memory.obsm["X_scgpt"], rtol=1e-5, atol=1e-6
    )
    assert back.uns["scgpt"]["params"]["precision_used"] == "fp32"


@pytest.mark.parametrize(
    ("subset", "copy", "match"),
    [(True, False, "view of a backed AnnData"), (False, True, "not possible for a backed")],
)
def test_backed_view_or_copy_refused_before_loading_weights(
    fixture_adata, checkpoint_dir, tmp_path, monkeypatch, subset, copy, match
):
    from scdlkit.foundation import _cell_embedding

    path = tmp_path / "cells.h5ad"
    fixture_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    target = backed[:5] if subset else backed

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(_cell_embedding, "load_encoder", fail)
    with pytest.raises(ValueError, match=match):
        sck.tl.embed(target, checkpoint=checkpoint_dir, progress=False, copy=copy)
    assert "X_scgpt" not in backed.obsm
    backed.file.close()


def test_dask_matrix_embedding(fixture_adata, checkpoint_dir, expected):
    da = pytest.importorskip("dask.array")
    fixture_adata.X = da.from_array(fixture_adata.X, chunks=(10, 400))
    sck.tl.embed(fixture_adata, checkpoint=checkpoint_dir, progress=False, chunk_size=16)
    assert _cosine(fixture_adata.obsm["X_scgpt"], expected["cls_embedding"]).min() > 0.9999


def test_subsampling_above_max_seq_len_is_chunk_invariant(fixture_adata, checkpoint_copy):
    import json

    args = json.loads((checkpoint_copy / "args.json").read_text())
    args["max_seq_len"] = 64  # fixture cells express far more genes: every cell is subsampled
    (checkpoint_copy / "args.json").write_text(json.dumps(args))
    fp32 = {"checkpoint": checkpoint_copy, "precision": "fp32", "progress": False}
    whole = sck.tl.embed(fixture_adata, **fp32, copy=True)
    chunked = sck.tl.embed(fixture_adata, **fp32, chunk_size=5, copy=True)
    np.testing.assert_allclose(chunked.obsm["X_scgpt"], whole.obsm["X_scgpt"], rtol=1e-5, atol=1e-6)
    again = sck.tl.embed(fixture_adata, **fp32, copy=True)
    np.testing.assert_array_equal(again.obsm["X_scgpt"], whole.obsm["X_scgpt"])


def test_sharded_embedding_over_two_processes(fixture_adata, checkpoint_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "_shard_script.py"
    data = tmp_path / "cells.h5ad"
    fixture_adata.write_h5ad(data)
    subprocess.run(
        [sys.executable, str(script), "embed", str(checkpoint_dir), str(data), str(tmp_path)],
        check=True,
        timeout=300,
    )
    single = sck.tl.embed(
        fixture_adata, checkpoint=checkpoint_dir, precision="fp32", progress=False, copy=True
    )
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_allclose(got, single.obsm["X_scgpt"], rtol=1e-5, atol=1e-6)


def test_cls_only_last_layer_matches_full_forward(checkpoint_dir, expected):
    model = load_scgpt_model(checkpoint_dir, device="cpu")
    ids = torch.as_tensor(expected["gene_ids"]).long()
    values = torch.as_tensor(expected["values"]).float()
    with torch.inference_mode():
        full = model(ids, values)[:, 0]
        cls = model.cls_embedding(ids, values)
    torch.testing.assert_close(cls, full, rtol=1e-5, atol=1e-6)
