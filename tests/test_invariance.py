"""One cell, one label: tokens, embeddings and labels depend on the cell alone.

Not on its row, its neighbours, the gene order, the chunk or batch size (exact in fp32; bf16
within the tolerance written in docs/outputs.md), and tests never depend on what
``precision="auto"`` picks unless they are marked ``auto_precision``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

import scdlkit as sck
from scdlkit._shared.hardware import NATIVE_BF16_ENV, native_bf16
from scdlkit.foundation import ScGPTAnnotationRunner, resolve_checkpoint, tokenize_adata
from scdlkit.foundation.models.scgpt._tokenize import (
    bin_values,
    cell_seed,
    collate_tokens,
    tokenize_matrix,
)

# the tolerances docs/outputs.md promises ("What a cell's result depends on")
LATENT_ATOL = 1e-4  # fp32: the same cell in other company, order or chunks (measured 1e-6)
BF16_COSINE = 0.9999  # bf16: another batch, or fp32 (measured 1 - 1.6e-5 at worst)
BF16_LABELS_MOVED = 0.02  # bf16: share of labels another batching may move (measured 4 of 700)


def _cell_tokens(tokens, i: int) -> tuple[list[int], list[float]]:
    batch = collate_tokens(tokens, [i])
    return batch["gene_ids"][0].tolist(), batch["values"][0].tolist()


def _all_cells(tokens) -> list[tuple[list[int], list[float]]]:
    return [_cell_tokens(tokens, i) for i in range(tokens.n_cells)]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def ckpt(checkpoint_dir):
    return resolve_checkpoint(checkpoint_dir)


def test_pbmc_cells_have_ties_that_span_bins(_pbmc_raw, ckpt):
    # the premise of the tests below: log-normalised cells are full of ties, so tie-breaking
    # draws decide most bins and must not depend on anything but the cell
    X = _pbmc_raw.X.tocsr() if sparse.issparse(_pbmc_raw.X) else sparse.csr_matrix(_pbmc_raw.X)
    values = X[0].data.astype(np.float64)
    assert len(np.unique(values)) < len(values) / 4
    one, other = (bin_values(values, ckpt.args.n_bins, [seed]) for seed in (0, 1))
    assert (one != other).any()


def test_tokens_do_not_depend_on_rows_genes_subset_or_chunks(_pbmc_raw, ckpt):
    reference = _all_cells(tokenize_adata(_pbmc_raw, ckpt, seed=42)[0])
    n, backwards = _pbmc_raw.n_obs, np.arange(_pbmc_raw.n_obs)[::-1]
    reversed_rows = _all_cells(tokenize_adata(_pbmc_raw[backwards], ckpt, seed=42)[0])
    assert reversed_rows == reference[::-1]
    dropped = _all_cells(tokenize_adata(_pbmc_raw[1:], ckpt, seed=42)[0])
    assert dropped == reference[1:]
    genes_backwards = np.arange(_pbmc_raw.n_vars)[::-1]
    reversed_genes = _all_cells(tokenize_adata(_pbmc_raw[:, genes_backwards], ckpt, seed=42)[0])
    assert reversed_genes == reference
    third = _all_cells(tokenize_adata(_pbmc_raw[::3], ckpt, seed=42)[0])
    assert third == reference[::3]
    twice = ad.concat([_pbmc_raw[n // 2 :], _pbmc_raw[: n // 2]])
    assert _all_cells(tokenize_adata(twice, ckpt, seed=42)[0]) == (
        reference[n // 2 :] + reference[: n // 2]
    )
    pieces = [tokenize_adata(_pbmc_raw, ckpt, seed=42, rows=slice(s, s + 128)) for s in (0, 128)]
    assert [c for t, _ in pieces for c in _all_cells(t)] == reference[:256]
    # the seed still matters: another random_state breaks the ties differently
    assert _all_cells(tokenize_adata(_pbmc_raw, ckpt, seed=0)[0]) != reference


def test_genes_are_stored_in_vocabulary_order(_pbmc_raw, ckpt):
    tokens, _ = tokenize_adata(_pbmc_raw[:20, np.arange(_pbmc_raw.n_vars)[::-1]], ckpt, seed=42)
    for i in range(tokens.n_cells):
        genes, _ = tokens.cell(i)
        assert (np.diff(genes) > 0).all()


def test_repeated_symbols_do_not_make_column_order_matter(ckpt):
    rng = np.random.default_rng(0)
    genes = [g for g in ckpt.vocab if not g.startswith("<")][:30]
    X = rng.integers(0, 4, size=(12, 32)).astype(np.float32)  # small counts: ties everywhere
    names = [*genes, genes[3], genes[7]]  # two symbols twice, as after a careless merge
    adata = ad.AnnData(X, var={"symbol": names})
    adata.var_names = [f"g{j}" for j in range(32)]
    forward = _all_cells(tokenize_adata(adata, ckpt, gene_key="symbol", seed=42)[0])
    flipped = adata[:, np.arange(32)[::-1]]
    backward = _all_cells(tokenize_adata(flipped, ckpt, gene_key="symbol", seed=42)[0])
    assert backward == forward


def test_subsampling_above_max_seq_len_follows_the_cell(_pbmc_raw, ckpt):
    vocab_ids = np.array([ckpt.vocab.get(g, -1) for g in _pbmc_raw.var_names])
    settings = {
        "n_bins": ckpt.args.n_bins,
        "cls_id": ckpt.cls_id,
        "pad_id": ckpt.pad_id,
        "pad_value": ckpt.args.pad_value,
        "max_seq_len": 40,  # every pbmc cell expresses more genes: all are subsampled
        "seed": 42,
    }
    X = sparse.csr_matrix(_pbmc_raw.X)
    whole = tokenize_matrix(X, vocab_ids, **settings)
    flipped = tokenize_matrix(X[::-1][:, ::-1], vocab_ids[::-1], **settings)
    n = whole.n_cells
    for i in range(0, n, 50):
        genes, bins = whole.cell(i)
        assert len(genes) == 39
        other_genes, other_bins = flipped.cell(n - 1 - i)
        np.testing.assert_array_equal(other_genes, genes)
        np.testing.assert_array_equal(other_bins, bins)


def test_cell_seed_reads_values_not_their_storage():
    ids = np.array([3, 9, 14])
    values = np.array([1.5, 2.0, 2.0], dtype=np.float32)
    seed = cell_seed(42, ids, values)
    assert seed == cell_seed(42, ids.astype(np.int32), values.astype(np.float64))
    assert seed[0] == 42
    assert seed != cell_seed(43, ids, values)
    assert seed != cell_seed(42, ids, values * 2)


# ------------------------------------------------------------------------------ tl.embed


def test_embed_does_not_depend_on_rows_batch_or_chunk(_pbmc_raw, checkpoint_dir):
    fp32 = {"checkpoint": checkpoint_dir, "precision": "fp32", "progress": False, "copy": True}
    reference = sck.tl.embed(_pbmc_raw, **fp32).obsm["X_scgpt"]
    backwards = np.arange(_pbmc_raw.n_obs)[::-1]
    reversed_rows = sck.tl.embed(_pbmc_raw[backwards], **fp32, batch_size=17).obsm["X_scgpt"]
    np.testing.assert_allclose(reversed_rows[::-1], reference, rtol=0, atol=1e-5)
    third = sck.tl.embed(_pbmc_raw[::3], **fp32, chunk_size=50).obsm["X_scgpt"]
    np.testing.assert_allclose(third, reference[::3], rtol=0, atol=1e-5)


def test_embed_and_runner_share_the_seed_default():
    import inspect

    embed = inspect.signature(sck.tl.embed).parameters["random_state"].default
    runner = inspect.signature(ScGPTAnnotationRunner).parameters["random_state"].default
    adapt = inspect.signature(sck.tl.adapt_annotation).parameters["random_state"].default
    assert embed == runner == adapt == 42


# ------------------------------------------------------------------------------ the runner


@pytest.fixture(scope="module")
def fitted_fp32(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe",),
        precision="fp32",
        progress=False,
    ).fit(_pbmc_raw)
    return runner, runner.predict(_pbmc_raw)


def _assert_same_cells(got: dict, expected: dict, rows) -> None:
    np.testing.assert_array_equal(got["labels"], expected["labels"][rows])
    latent_diff = np.abs(got["latent"] - expected["latent"][rows]).max()
    assert latent_diff < LATENT_ATOL, latent_diff


def test_fp32_labels_follow_the_cell(fitted_fp32, _pbmc_raw, tmp_path):
    runner, expected = fitted_fp32
    n, backwards = _pbmc_raw.n_obs, np.arange(_pbmc_raw.n_obs)[::-1]
    cases = {
        "rows reversed": (_pbmc_raw[backwards], backwards),
        "first row dropped": (_pbmc_raw[1:], np.arange(1, n)),
        "genes reversed": (_pbmc_raw[:, np.arange(_pbmc_raw.n_vars)[::-1]], np.arange(n)),
        "every third cell": (_pbmc_raw[::3], np.arange(0, n, 3)),
    }
    for name, (query, rows) in cases.items():
        got = runner.predict(query.copy())
        try:
            _assert_same_cells(got, expected, rows)
        except AssertionError as err:
            raise AssertionError(name) from err
    _pbmc_raw.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    try:
        _assert_same_cells(runner.predict(backed, chunk_size=128), expected, np.arange(n))
    finally:
        backed.file.close()


def test_bf16_latent_stays_close_and_few_labels_move(_pbmc_raw, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("frozen_probe",),
        precision="bf16",
        progress=False,
    ).fit(_pbmc_raw)
    assert runner.params()["precision_used"] == "bf16"
    expected = runner.predict(_pbmc_raw)
    backwards = np.arange(_pbmc_raw.n_obs)[::-1]
    for query, rows, chunk_size in [
        (_pbmc_raw[backwards], backwards, 128),
        (_pbmc_raw[::3], np.arange(0, _pbmc_raw.n_obs, 3), None),
    ]:
        got = runner.predict(query.copy(), chunk_size=chunk_size)
        assert _cosine(got["latent"], expected["latent"][rows]).min() > BF16_COSINE
        moved = got["labels"] != expected["labels"][rows]
        assert moved.mean() <= BF16_LABELS_MOVED, moved.sum()


def test_bf16_embedding_stays_close_to_fp32(_pbmc_raw, checkpoint_dir):
    cells = _pbmc_raw[::4].copy()
    common = {"checkpoint": checkpoint_dir, "progress": False, "copy": True}
    fp32 = sck.tl.embed(cells, **common, precision="fp32").obsm["X_scgpt"]
    backwards = np.arange(cells.n_obs)[::-1]
    bf16 = sck.tl.embed(cells[backwards], **common, precision="bf16", batch_size=16)
    assert bf16.uns["scgpt"]["params"]["precision_used"] == "bf16"
    assert _cosine(bf16.obsm["X_scgpt"][::-1], fp32).min() > BF16_COSINE


# ------------------------------------------------------------------------------ precision="auto"


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False)])
def test_environment_variable_decides_native_bf16_on_cpu(monkeypatch, value, expected):
    from scdlkit._shared import hardware

    # the CPU flags say the opposite of the variable: the variable wins
    flags = frozenset({"avx2"} if expected else {"avx2", "amx_bf16"})
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    monkeypatch.setenv(NATIVE_BF16_ENV, value)
    assert native_bf16("cpu") is expected
    monkeypatch.setenv(NATIVE_BF16_ENV, "")
    assert native_bf16("cpu") is not expected  # empty: the flags decide
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=NATIVE_BF16_ENV):
        native_bf16("cpu")


@pytest.mark.auto_precision
def test_auto_embedding_is_the_chosen_precision(fixture_adata, checkpoint_dir, expected):
    chosen = "bf16" if native_bf16("cpu") else "fp32"
    common = {"checkpoint": checkpoint_dir, "device": "cpu", "progress": False, "copy": True}
    auto = sck.tl.embed(fixture_adata, **common)
    explicit = sck.tl.embed(fixture_adata, **common, precision=chosen)
    assert auto.uns["scgpt"]["params"]["precision_used"] == chosen
    np.testing.assert_array_equal(auto.obsm["X_scgpt"], explicit.obsm["X_scgpt"])
    assert _cosine(auto.obsm["X_scgpt"], expected["cls_embedding"]).min() > BF16_COSINE


@pytest.mark.auto_precision
def test_auto_runner_and_trainer_use_the_chosen_precision(fixture_adata, checkpoint_dir):
    from scdlkit.training import Trainer

    chosen = "bf16" if native_bf16("cpu") else "fp32"
    trainer = Trainer(torch.nn.Linear(4, 2), accelerator="cpu", progress=False)
    assert trainer.precision == ("bf16-mixed" if chosen == "bf16" else "32-true")
    runner = ScGPTAnnotationRunner(label_key="bulk_labels", checkpoint=checkpoint_dir, device="cpu")
    assert runner.params()["precision_used"] == chosen
