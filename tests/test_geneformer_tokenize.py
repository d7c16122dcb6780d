"""Geneformer tokens equal the official TranscriptomeTokenizer's (modulo upstream's tie order)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from scdlkit.foundation.models._contract import TokenStore
from scdlkit.foundation.models.geneformer import (
    GeneformerTokens,
    match_geneformer_genes,
    resolve_geneformer_checkpoint,
    tokenize_geneformer,
)

DATA = Path(__file__).parent / "data"
VERSIONS = ("v2", "v1")


def _fixture_dir(version: str) -> Path:
    """The committed parity fixture (made with the official code; README beside the data)."""
    return DATA / f"geneformer-tiny-{version}"


@pytest.fixture(scope="module", params=VERSIONS)
def fixture(request: pytest.FixtureRequest) -> dict:
    path = _fixture_dir(request.param)
    return {
        "version": request.param,
        "path": path,
        "checkpoint": resolve_geneformer_checkpoint(path / "checkpoint"),
        "expected": json.loads((path / "tokens.json").read_text()),
    }


@pytest.fixture
def adata(fixture: dict) -> ad.AnnData:
    return ad.read_h5ad(fixture["path"] / "data.h5ad")


@pytest.fixture(scope="module")
def v2() -> dict:
    path = _fixture_dir("v2")
    return {"path": path, "checkpoint": resolve_geneformer_checkpoint(path / "checkpoint")}


def _assert_official(tokens: GeneformerTokens, expected: dict) -> None:
    """Exact outside the recorded tie runs, equal as sets inside each; lengths equal."""
    assert tokens.n_cells == len(expected["input_ids"])
    np.testing.assert_array_equal(tokens.lengths, expected["length"])
    for i, (official, runs) in enumerate(
        zip(expected["input_ids"], expected["tie_runs"], strict=True)
    ):
        ours = tokens.cell(i).tolist()
        outside = np.ones(len(official), dtype=bool)
        for start, stop in runs:
            outside[start:stop] = False
            assert sorted(ours[start:stop]) == sorted(official[start:stop]), (i, start, stop)
        assert np.array_equal(np.array(ours)[outside], np.array(official)[outside]), i


def test_tokens_equal_official_for_every_cell(fixture: dict, adata: ad.AnnData) -> None:
    tokens, match = tokenize_geneformer(adata, fixture["checkpoint"], gene_key="ensembl_id")
    expected = fixture["expected"]
    _assert_official(tokens, expected)
    assert match.collapsed == expected["collapse_triggered"]
    assert tokens.gene_ids.dtype == np.int32
    assert tokens.indptr.dtype == np.int64
    assert tokens.max_seq_len == fixture["checkpoint"].model_input_size


def test_tie_free_cells_are_exact(fixture: dict, adata: ad.AnnData) -> None:
    tokens, _ = tokenize_geneformer(adata, fixture["checkpoint"], gene_key="ensembl_id")
    expected = fixture["expected"]
    tie_free = [i for i, runs in enumerate(expected["tie_runs"]) if not runs]
    assert len(tie_free) == 10
    for i in tie_free:
        assert tokens.cell(i).tolist() == expected["input_ids"][i]
    # where the official unstable sort happened to keep column order, ours is identical too
    for i, same in enumerate(expected["official_equals_stable_column_order"]):
        if same:
            assert tokens.cell(i).tolist() == expected["input_ids"][i]


def test_specials_and_truncation(fixture: dict, adata: ad.AnnData) -> None:
    ckpt = fixture["checkpoint"]
    tokens, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    expected = fixture["expected"]
    assert tokens.lengths.max() == ckpt.model_input_size
    if ckpt.version == "V2":
        assert all(tokens.cell(i)[0] == 2 and tokens.cell(i)[-1] == 3 for i in range(48))
        assert tokens.n_special == 2
    else:
        assert tokens.cls_id is None
        assert tokens.n_special == 0
    short, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id", model_input_size=40)
    assert short.lengths.max() == 40
    for i in range(short.n_cells):
        full = tokens.cell(i)
        if ckpt.version == "V2":
            assert short.cell(i)[:-1].tolist() == full[: len(short.cell(i)) - 1].tolist()
            assert short.cell(i)[-1] == 3
        else:
            assert short.cell(i).tolist() == full[:40].tolist()
    uncropped = expected["input_ids_uncropped"]
    assert any(len(u) > ckpt.model_input_size for u in uncropped)  # truncation is exercised
    # the store remembers how many genes each cell expressed before truncation
    np.testing.assert_array_equal(tokens.n_genes_per_cell, [len(u) for u in uncropped])
    assert (tokens.n_genes <= tokens.n_genes_per_cell).all()
    with pytest.raises(ValueError, match="exceeds the model's"):
        tokenize_geneformer(adata, ckpt, gene_key="ensembl_id", model_input_size=10_000)


def test_exact_duplicate_id_without_alias_keeps_the_token_twice(v2: dict) -> None:
    adata = ad.read_h5ad(v2["path"] / "data_dup_exact.h5ad")
    expected = json.loads((v2["path"] / "tokens_dup_exact.json").read_text())
    assert not sparse.issparse(adata.X)
    tokens, match = tokenize_geneformer(adata, v2["checkpoint"], gene_key="ensembl_id")
    assert not match.collapsed
    assert not expected["collapse_triggered"]
    _assert_official(tokens, expected)
    twice = [i for i in range(tokens.n_cells) if len(set(tokens.cell(i))) < tokens.lengths[i]]
    assert len(twice) == 5


def test_alias_triggers_collapsing_with_sums_after_singles(v2: dict) -> None:
    adata = ad.read_h5ad(v2["path"] / "data.h5ad")
    match = match_geneformer_genes(adata, v2["checkpoint"].dictionaries, "ensembl_id")
    assert match.collapsed
    summed = {str(match.ensembl_ids[g[0]]) for g in match.summed_groups}
    assert summed == {"ENSG00000157540", "ENSG00000160818"}
    assert match.n_columns == len(match.single_columns) + 2
    columns = match.column_token_ids
    assert len(set(columns.tolist())) == len(columns)  # one column per gene after collapsing


def test_chunks_backed_and_row_order_do_not_change_tokens(
    fixture: dict, adata: ad.AnnData, tmp_path: Path
) -> None:
    ckpt = fixture["checkpoint"]
    whole, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    chunked, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id", chunk_size=7)
    backed = ad.read_h5ad(fixture["path"] / "data.h5ad", backed="r")
    streamed, _ = tokenize_geneformer(backed, ckpt, gene_key="ensembl_id", chunk_size=5)
    backed.file.close()
    for other in (chunked, streamed):
        np.testing.assert_array_equal(other.indptr, whole.indptr)
        np.testing.assert_array_equal(other.gene_ids, whole.gene_ids)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    shuffled, _ = tokenize_geneformer(adata[order], ckpt, gene_key="ensembl_id")
    for new, old in enumerate(order):
        assert shuffled.cell(new).tolist() == whole.cell(int(old)).tolist()
    # ties are ordered by token id, so the order of the genes changes nothing either (DESIGN 7)
    genes = np.random.default_rng(1).permutation(adata.n_vars)
    regenes, _ = tokenize_geneformer(adata[:, genes].copy(), ckpt, gene_key="ensembl_id")
    np.testing.assert_array_equal(regenes.indptr, whole.indptr)
    np.testing.assert_array_equal(regenes.gene_ids, whole.gene_ids)


def test_n_counts_defaults_to_the_row_total(fixture: dict, adata: ad.AnnData) -> None:
    ckpt = fixture["checkpoint"]
    given, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    del adata.obs["n_counts"]  # the fixture's n_counts are the row totals over all genes
    derived, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    np.testing.assert_array_equal(derived.gene_ids, given.gene_ids)
    # n_counts is a per-cell constant: as upstream, a wrong one does not change the ranking
    adata.obs["n_counts"] = 1.0
    scaled, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    np.testing.assert_array_equal(scaled.gene_ids, given.gene_ids)
    adata.obs["n_counts"] = 0.0
    with pytest.raises(ValueError, match=r"obs\['n_counts'\] of cell 'cell000' is 0.0"):
        tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")


def test_cells_without_token_genes_keep_their_row(
    fixture: dict, adata: ad.AnnData, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = fixture["checkpoint"]
    full, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    x = adata.X.toarray()
    x[3] = 0
    adata.X = sparse.csr_matrix(x)
    with caplog.at_level(logging.WARNING, logger="scdlkit"):
        tokens, _ = tokenize_geneformer(adata, ckpt, gene_key="ensembl_id")
    assert "1 of" in caplog.text
    assert "express no gene" in caplog.text
    assert tokens.n_cells == adata.n_obs
    assert tokens.n_genes[3] == 0
    assert tokens.cell(3).tolist() == ([2, 3] if ckpt.version == "V2" else [])
    for i in (2, 4):
        assert tokens.cell(i).tolist() == full.cell(i).tolist()


def test_collate_pads_to_the_longest_cell(fixture: dict, adata: ad.AnnData) -> None:
    tokens, _ = tokenize_geneformer(adata, fixture["checkpoint"], gene_key="ensembl_id")
    cells = [5, 0, 9]
    assert isinstance(tokens, TokenStore)
    batch = tokens.collate(cells)
    width = int(tokens.lengths[cells].max())
    assert batch["gene_ids"].shape == batch["values"].shape == (3, width)
    assert str(batch["gene_ids"].dtype) == "torch.int64"
    assert str(batch["values"].dtype) == "torch.float32"
    assert not batch["values"].any()
    for row, cell in enumerate(cells):
        n = int(tokens.lengths[cell])
        assert batch["gene_ids"][row, :n].tolist() == tokens.cell(cell).tolist()
        assert not batch["padding_mask"][row, :n].any()
        assert batch["padding_mask"][row, n:].all()
        assert (batch["gene_ids"][row, n:] == tokens.pad_id).all()
    assert (
        tokens.nbytes == tokens.indptr.nbytes + tokens.gene_ids.nbytes + tokens.n_expressed.nbytes
    )


def test_symbols_go_through_the_gene_name_dictionary(v2: dict) -> None:
    adata = ad.read_h5ad(v2["path"] / "data.h5ad")
    dicts = v2["checkpoint"].dictionaries
    by_symbol = match_geneformer_genes(adata, dicts)  # var_names hold symbols
    assert by_symbol.id_type == "symbol"
    converted = adata.copy()
    converted.var["ensembl_id"] = [dicts.gene_name_id.get(s, "none") for s in adata.var_names]
    tokens, match = tokenize_geneformer(adata, v2["checkpoint"])
    reference, _ = tokenize_geneformer(converted, v2["checkpoint"], gene_key="ensembl_id")
    np.testing.assert_array_equal(tokens.gene_ids, reference.gene_ids)
    assert match.n_matched == by_symbol.n_matched > 0.5 * adata.n_vars
    # read as ids, symbols take upstream's route: V2's mapping dictionary maps upper-cased
    # symbols too (here one more gene, and an alias that triggers collapsing)
    forced = match_geneformer_genes(adata, dicts, id_type="ensembl")
    assert forced.id_type == "ensembl"
    assert forced.n_matched == by_symbol.n_matched + 1
    assert forced.collapsed
    assert not by_symbol.collapsed


def test_log_normalised_pbmc_raw_is_refused(v2: dict) -> None:
    pbmc = sc.datasets.pbmc68k_reduced().raw.to_adata()
    with pytest.raises(ValueError, match=r"non-integer values.*log-normalised.*raw integer"):
        tokenize_geneformer(pbmc, v2["checkpoint"])


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "negative values"), (np.nan, "a non-finite value"), (2.5, "non-integer values")],
)
def test_values_that_are_not_counts_are_refused(v2: dict, value, message) -> None:
    adata = ad.read_h5ad(v2["path"] / "data.h5ad")
    adata.layers["counts"] = adata.X.copy()
    x = adata.X.toarray()
    x[1, 3] = value
    adata.X = sparse.csr_matrix(x)
    with pytest.raises(ValueError, match=rf"adata\.X holds {message}.*cell001.*\['counts'\]"):
        tokenize_geneformer(adata, v2["checkpoint"], gene_key="ensembl_id")
    tokens, _ = tokenize_geneformer(adata, v2["checkpoint"], gene_key="ensembl_id", layer="counts")
    assert tokens.n_cells == adata.n_obs


def test_no_matching_gene_is_refused(v2: dict) -> None:
    adata = ad.read_h5ad(v2["path"] / "data.h5ad")
    adata.var["ensembl_id"] = [f"ENSG99{i:09d}" for i in range(adata.n_vars)]
    with pytest.raises(ValueError, match=r"only 0 of 942 genes in adata\.var\['ensembl_id'\]"):
        tokenize_geneformer(adata, v2["checkpoint"], gene_key="ensembl_id")
    with pytest.raises(KeyError, match="gene_key='gene_ids'"):
        tokenize_geneformer(adata, v2["checkpoint"], gene_key="gene_ids")


def test_dictionaries_alone_use_upstream_input_sizes(v2: dict) -> None:
    adata = ad.read_h5ad(v2["path"] / "data.h5ad")
    tokens, _ = tokenize_geneformer(adata, v2["checkpoint"].dictionaries, gene_key="ensembl_id")
    assert tokens.max_seq_len == 4096
    tokens, _ = tokenize_geneformer(adata, v2["path"] / "dictionaries", gene_key="ensembl_id")
    assert tokens.max_seq_len == 4096
    tokens, _ = tokenize_geneformer(adata, v2["path"] / "checkpoint", gene_key="ensembl_id")
    assert tokens.max_seq_len == 512
    with pytest.raises(ValueError, match="at least 3"):
        tokenize_geneformer(adata, v2["checkpoint"], gene_key="ensembl_id", model_input_size=2)
