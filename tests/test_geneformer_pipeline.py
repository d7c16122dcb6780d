"""Geneformer end to end through the public API: embed, adapt, save/load, annotate, markers, CLI.

The fixtures under ``tests/data/geneformer-tiny-{v2,v1}`` were made with the official Geneformer
code (their READMEs say how); the labelled data here are synthetic counts over the V2 fixture's
genes, small enough that every strategy fits in seconds.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from anndata.tests.helpers import assert_equal
from scipy import sparse
from torch import nn

import scdlkit as sck
import scdlkit.foundation
from scdlkit.cli import main
from scdlkit.foundation.peft import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    LoRALinear,
    PrefixTuningConfig,
    apply_peft,
    peft_parameter_names,
)

DATA = Path(__file__).parent / "data"
KEY = "scgpt_annotation"
FP32 = {"device": "cpu", "precision": "fp32", "progress": False}
ALL_STRATEGIES = (
    "frozen_probe",
    "head",
    "full_finetune",
    "lora",
    "adapter",
    "prefix_tuning",
    "ia3",
    "baseline",
)
#: The upstream default embedding of each version (EmbExtractor: V2 "cls", V1 "cell", layer -1).
UPSTREAM_EMBEDDING = {"v2": "emb_cls_layer-1.npy", "v1": "emb_cell_layer-1.npy"}
#: Cells without any rank tie, as listed in each fixture's README ("Cells without any tie").
TIE_FREE = {
    "v2": [
        "cell010", "cell019", "cell021", "cell022", "cell024",
        "cell030", "cell034", "cell040", "cell044", "cell047",
    ],
    "v1": [
        "cell002", "cell004", "cell015", "cell019", "cell021",
        "cell023", "cell024", "cell027", "cell031", "cell037",
    ],
}  # fmt: skip
N_GENES = 150  # genes of the synthetic data (short token sequences keep the fits fast)
N_MARKERS = 10  # marker genes per class
CLASSES = ("a", "b", "c")


def _fixture_dir(version: str) -> Path:
    """The committed parity fixture (made with the official code; README beside the data)."""
    return DATA / f"geneformer-tiny-{version}"


def _checkpoint(version: str = "v2") -> Path:
    return _fixture_dir(version) / "checkpoint"


def _synthetic_counts(n_per_class: int, seed: int, labelled: bool = True) -> ad.AnnData:
    """Poisson counts over the V2 fixture's first genes (Ensembl id column deduplicated), with
    ``N_MARKERS`` genes raised per class; ``obs["cell_type"]`` when ``labelled``."""
    ref = ad.read_h5ad(_fixture_dir("v2") / "data.h5ad")
    # the expression baseline refuses a duplicated gene name; Geneformer itself would not
    var = ref.var[~ref.var["ensembl_id"].duplicated().to_numpy()].iloc[:N_GENES].copy()
    rng = np.random.default_rng(seed)
    labels = np.repeat(CLASSES, n_per_class)
    counts = rng.poisson(0.3, size=(len(labels), len(var))).astype(np.float32)
    for k, label in enumerate(CLASSES):
        rows = labels == label
        columns = slice(k * N_MARKERS, (k + 1) * N_MARKERS)
        counts[rows, columns] += rng.poisson(8.0, size=(int(rows.sum()), N_MARKERS))
    obs = pd.DataFrame(index=[f"s{seed}c{i:03d}" for i in range(len(labels))])
    if labelled:
        obs["cell_type"] = pd.Categorical(labels)
    return ad.AnnData(sparse.csr_matrix(counts), obs=obs, var=var)


def _run_cli(argv: list) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module", params=("v2", "v1"))
def embedded(request: pytest.FixtureRequest) -> dict:
    """``tl.embed`` of a fixture's cells, in memory (fp32, CPU)."""
    version = request.param
    path = _fixture_dir(version)
    adata = ad.read_h5ad(path / "data.h5ad")
    sck.tl.embed(
        adata, checkpoint=path / "checkpoint", gene_key="ensembl_id", key_added="gf", **FP32
    )
    return {"version": version, "path": path, "adata": adata}


def test_embed_equals_upstream_embedding_for_tie_free_cells(embedded: dict) -> None:
    path, adata = embedded["path"], embedded["adata"]
    tokens = json.loads((path / "tokens.json").read_text())
    # the README's list is exactly the cells without a tie run
    assert TIE_FREE[embedded["version"]] == [
        cell for cell, runs in zip(tokens["cell_id"], tokens["tie_runs"], strict=True) if not runs
    ]
    rows = adata.obs_names.get_indexer(TIE_FREE[embedded["version"]])
    assert (rows >= 0).all()
    upstream = np.load(path / UPSTREAM_EMBEDDING[embedded["version"]])
    upstream = upstream / np.linalg.norm(upstream, axis=1, keepdims=True)
    ours = adata.obsm["X_gf"]
    assert ours.dtype == np.float32
    assert ours.shape == (adata.n_obs, upstream.shape[1])
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[rows], upstream[rows], rtol=0, atol=1e-5)
    params = adata.uns["gf"]["params"]
    assert params["precision_used"] == "fp32"
    assert params["gene_key"] == "ensembl_id"


def test_embed_chunked_and_backed_equal_in_memory(embedded: dict) -> None:
    path, whole = embedded["path"], embedded["adata"].obsm["X_gf"]
    kwargs = {"checkpoint": path / "checkpoint", "gene_key": "ensembl_id", "key_added": "gf"}
    chunked = ad.read_h5ad(path / "data.h5ad")
    sck.tl.embed(chunked, chunk_size=7, **kwargs, **FP32)
    np.testing.assert_allclose(chunked.obsm["X_gf"], whole, rtol=1e-5, atol=1e-6)
    backed = ad.read_h5ad(path / "data.h5ad", backed="r")
    try:
        sck.tl.embed(backed, **kwargs, **FP32)
        np.testing.assert_allclose(backed.obsm["X_gf"], whole, rtol=1e-5, atol=1e-6)
    finally:
        backed.file.close()


def test_embed_in_bf16_stays_close_to_fp32(embedded: dict) -> None:
    """The bf16 path on any CPU (autocast runs without native units, only slower): what
    precision="auto" picks on CPUs with AMX or AVX512-BF16."""
    path, whole = embedded["path"], embedded["adata"].obsm["X_gf"]
    bf16 = ad.read_h5ad(path / "data.h5ad")
    sck.tl.embed(
        bf16,
        checkpoint=path / "checkpoint",
        gene_key="ensembl_id",
        key_added="gf",
        precision="bf16",
        progress=False,
    )
    assert bf16.uns["gf"]["params"]["precision_used"] == "bf16"
    emb = bf16.obsm["X_gf"]
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert (emb * whole).sum(axis=1).min() > 0.99  # unit rows: cosine to the fp32 embedding


# ------------------------------------------------------------------------ raw counts needed


def _log_normalised(adata: ad.AnnData) -> ad.AnnData:
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def test_log_normalised_input_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    # fixture data for embed (a duplicated id is fine for Geneformer), synthetic for adapt
    embed_input = _log_normalised(ad.read_h5ad(_fixture_dir("v2") / "data.h5ad"))
    before = embed_input.copy()
    with pytest.raises(ValueError, match="raw integer counts"):
        sck.tl.embed(embed_input, checkpoint=_checkpoint(), gene_key="ensembl_id", **FP32)
    assert_equal(embed_input, before)

    adapt_input = _log_normalised(_synthetic_counts(10, seed=5))
    before = adapt_input.copy()
    with pytest.raises(ValueError, match="raw integer counts"):
        sck.tl.adapt_annotation(
            adapt_input,
            "cell_type",
            checkpoint=_checkpoint(),
            gene_key="ensembl_id",
            output_dir=tmp_path / "run",
            epochs=1,
            **FP32,
        )
    assert_equal(adapt_input, before)
    # nothing of a run was written (the folder's lock file may stay: it is how saves lock)
    run = tmp_path / "run"
    if run.exists():
        assert {p.name for p in run.iterdir()} <= {".scdlkit.lock"}


# -------------------------------------------------------------------- adapt / load / annotate


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every strategy fitted on synthetic counts with the V2 checkpoint (``keep="all"``); the
    fitted runner is caught on its way out of ``scdlkit.foundation.adapt_scgpt_annotation``."""
    folder = tmp_path_factory.mktemp("gf_adapt")
    reference = _synthetic_counts(40, seed=0)
    query = _synthetic_counts(12, seed=1, labelled=False)
    fitted = []
    original = scdlkit.foundation.adapt_scgpt_annotation

    def spy(*args, **kwargs):
        fitted.append(original(*args, **kwargs))
        return fitted[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scdlkit.foundation, "adapt_scgpt_annotation", spy)
        sck.tl.adapt_annotation(
            reference,
            "cell_type",
            checkpoint=_checkpoint(),
            strategies=ALL_STRATEGIES,
            gene_key="ensembl_id",
            output_dir=folder / "run",
            keep="all",
            epochs=1,
            random_state=0,
            **FP32,
        )
    assert len(fitted) == 1
    return {
        "folder": folder,
        "reference": reference,
        "query": query,
        "runner": fitted[0],
        "runner_dir": Path(reference.uns[KEY]["runner_dir"]),
        # what the fitted runner predicts for the query, with each kept strategy
        "predictions": {s: fitted[0].predict(query, strategy=s) for s in ALL_STRATEGIES},
    }


def test_adapt_fits_every_strategy_on_geneformer(adapted: dict) -> None:
    reference, runner_dir = adapted["reference"], adapted["runner_dir"]
    uns = reference.uns[KEY]
    metrics = pd.DataFrame(uns["strategy_metrics"])
    assert sorted(metrics["strategy"]) == sorted(ALL_STRATEGIES)
    assert len(metrics) == len(ALL_STRATEGIES)
    assert uns["best_strategy"] in ALL_STRATEGIES
    assert list(uns["label_categories"]) == list(CLASSES)
    assert runner_dir == adapted["folder"] / "run" / "runner"
    assert set(reference.obs[KEY].dropna()) <= set(CLASSES)
    assert reference.obsm[f"X_{KEY}"].shape[0] == reference.n_obs
    manifest = json.loads((runner_dir / "manifest.json").read_text())
    assert manifest["checkpoint"]["model"] == "geneformer"
    assert sorted(adapted["runner"].kept_strategies_) == sorted(ALL_STRATEGIES)
    # every other kept strategy is a runner of its own; those reading Geneformer say so
    others = [s for s in ALL_STRATEGIES if s not in ("baseline", uns["best_strategy"])]
    assert len(others) >= len(ALL_STRATEGIES) - 2
    for strategy in others:
        kept = json.loads((runner_dir / "strategies" / strategy / "manifest.json").read_text())
        assert kept["best_strategy"] == strategy
        assert kept["checkpoint"]["model"] == "geneformer", strategy


def test_loaded_runner_predicts_exactly_what_the_fitted_one_does(adapted: dict) -> None:
    runner, query = adapted["runner"], adapted["query"]
    loaded = sck.AnnotationRunner.load(adapted["runner_dir"], device="cpu")
    assert loaded.best_strategy_ == runner.best_strategy_
    assert sorted(loaded.kept_strategies_) == sorted(ALL_STRATEGIES)
    for strategy in ALL_STRATEGIES:
        fitted = adapted["predictions"][strategy]
        again = loaded.predict(query, strategy=strategy)
        assert fitted["probabilities"].shape == (query.n_obs, len(CLASSES))
        np.testing.assert_array_equal(
            again["probabilities"], fitted["probabilities"], err_msg=strategy
        )
        np.testing.assert_array_equal(again["labels"], fitted["labels"], err_msg=strategy)


def test_annotate_with_every_kept_strategy_and_round_trip(adapted: dict, tmp_path: Path) -> None:
    runner_dir = adapted["runner_dir"]
    query = adapted["query"].copy()
    for strategy in ALL_STRATEGIES:
        labelled = sck.tl.annotate(query, runner_dir, strategy=strategy, device="cpu", copy=True)
        expected = adapted["predictions"][strategy]
        assert labelled.uns[KEY]["strategy"] == strategy
        np.testing.assert_array_equal(
            labelled.obs[KEY].astype(str).to_numpy(), expected["labels"], err_msg=strategy
        )
        np.testing.assert_array_equal(
            labelled.obsm[f"{KEY}_probabilities"].to_numpy(),
            expected["probabilities"],
            err_msg=strategy,
        )
    # written in place for the round trip, with the reference's results beside
    sck.tl.annotate(query, runner_dir, strategy="lora", device="cpu")
    for name, adata in (("reference", adapted["reference"]), ("query", query)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        assert_equal(ad.read_h5ad(tmp_path / f"{name}.h5ad"), adata)
        adata.write_zarr(tmp_path / f"{name}.zarr")
        assert_equal(ad.read_zarr(tmp_path / f"{name}.zarr"), adata)


@pytest.mark.parametrize("strategy", ["lora", "baseline"])
def test_annotation_markers_name_genes_by_the_anndatas_ids(adapted: dict, strategy: str) -> None:
    query = adapted["query"].copy()
    sck.tl.annotate(query, adapted["runner_dir"], strategy=strategy, device="cpu")
    sck.tl.annotation_markers(query, n_genes=5, n_steps=4, device="cpu")
    markers = query.uns[f"{KEY}_markers"]
    assert isinstance(markers, pd.DataFrame)
    assert len(markers) > 0
    assert list(markers.columns[:4]) == ["label", "rank", "gene", "score"]
    assert set(markers["label"]) <= set(CLASSES)
    assert (markers["score"] > 0).all()
    # named by adata.var["ensembl_id"] (the runner's gene_key), not by symbols or token ids
    assert set(markers["gene"]) <= set(query.var["ensembl_id"])
    assert query.uns[f"{KEY}_markers_params"]["strategy"] == strategy


# --------------------------------------------------------------------------------------- PEFT


def _batch(n_cells: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """The official V2 tokens of the fixture's first cells, right-padded."""
    cells = json.loads((_fixture_dir("v2") / "tokens.json").read_text())["input_ids"][:n_cells]
    width = max(len(c) for c in cells)
    ids = torch.zeros(len(cells), width, dtype=torch.long)
    for row, cell in enumerate(cells):
        ids[row, : len(cell)] = torch.tensor(cell)
    return ids, ids.eq(0)


@pytest.fixture(scope="module")
def gf_encoder() -> nn.Module:
    return sck.foundation.load_encoder(_checkpoint())


@pytest.mark.parametrize(
    "config",
    [LoRAConfig(), AdapterConfig(), PrefixTuningConfig(), IA3Config()],
    ids=lambda c: type(c).__name__,
)
def test_every_peft_method_changes_geneformer_eval_outputs(gf_encoder: nn.Module, config) -> None:
    ids, mask = _batch()
    with torch.inference_mode():
        plain = gf_encoder.cls_embedding(ids, None, mask)
    torch.manual_seed(0)
    adapted = apply_peft(copy.deepcopy(gf_encoder), config)
    names = peft_parameter_names(adapted)
    assert names, "no adaptation parameter was added"
    parameters = dict(adapted.named_parameters())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            param = parameters[name]
            param.copy_(0.5 * torch.randn(param.shape, generator=generator) + 0.1)
    adapted.eval()
    with torch.inference_mode():
        first = adapted.cls_embedding(ids, None, mask)
        second = adapted.cls_embedding(ids, None, mask)
    torch.testing.assert_close(second, first, rtol=0, atol=0)  # no dropout in eval mode
    adapted.train()  # ... while training mode does drop out, so the check above means something
    with torch.no_grad():
        assert not torch.equal(adapted.cls_embedding(ids, None, mask), first)
    adapted.eval()
    assert (first - plain).abs().max() > 1e-2
    assert torch.isfinite(first).all()
    # the source encoder was not touched
    assert not peft_parameter_names(gf_encoder)
    with torch.inference_mode():
        torch.testing.assert_close(gf_encoder.cls_embedding(ids, None, mask), plain)


def test_lora_wraps_the_separate_query_and_value_linears(gf_encoder: nn.Module) -> None:
    adapted = apply_peft(copy.deepcopy(gf_encoder), LoRAConfig(rank=4, target_modules=("q", "v")))
    hidden = gf_encoder.d_model
    for layer in adapted.encoder.layer:
        attention = layer.attention.self
        for role, linear in (("q", attention.query), ("v", attention.value)):
            assert isinstance(linear, LoRALinear)
            # one update over all the linear's rows, not a third of a packed projection
            assert linear.slices == {role: (0, hidden)}
            assert linear.lora_A[role].shape == (4, hidden)
            assert linear.lora_B[role].shape == (hidden, 4)
        assert type(attention.key) is nn.Linear
        assert type(layer.attention.output.dense) is nn.Linear
    names = peft_parameter_names(adapted)
    assert "encoder.layer.0.attention.self.query.lora_A.q" in names
    assert "encoder.layer.0.attention.self.value.lora_B.v" in names
    assert len(names) == 4 * gf_encoder.n_layers
    # the pretrained weights keep their state-dict names
    assert set(gf_encoder.state_dict()) <= set(adapted.state_dict())


# ---------------------------------------------------------------------------------------- CLI


def test_cli_embed_adapt_and_annotate_with_a_geneformer_folder(tmp_path: Path) -> None:
    ref_path, query_path = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    _synthetic_counts(20, seed=2).write_h5ad(ref_path)
    _synthetic_counts(5, seed=3, labelled=False).write_h5ad(query_path)
    common = ["--gene-key", "ensembl_id", "--device", "cpu"]

    out = tmp_path / "results" / "ref_annotated.h5ad"
    code, stdout, stderr = _run_cli(
        [
            "adapt", ref_path, "--label-key", "cell_type", "-o", out,
            "--checkpoint", _checkpoint(), "--strategies", "frozen_probe", "lora", "baseline",
            "--epochs", "1", "--precision", "fp32", *common,
        ]
    )  # fmt: skip
    assert code == 0, stderr
    result = ad.read_h5ad(out)
    metrics = pd.DataFrame(result.uns[KEY]["strategy_metrics"])
    assert sorted(metrics["strategy"]) == ["baseline", "frozen_probe", "lora"]
    runner_dir = Path(result.uns[KEY]["runner_dir"])
    assert runner_dir == tmp_path / "results" / "ref_annotated_scdlkit" / "runner"
    manifest = json.loads((runner_dir / "manifest.json").read_text())
    assert manifest["checkpoint"]["model"] == "geneformer"
    assert str(runner_dir) in stdout
    assert set(result.obs[KEY]) <= set(CLASSES)

    labelled = tmp_path / "query_annotated.h5ad"
    code, _, stderr = _run_cli(
        ["annotate", query_path, "--runner", runner_dir, "-o", labelled, *common]
    )
    assert code == 0, stderr
    assert set(ad.read_h5ad(labelled).obs[KEY]) <= set(CLASSES)

    embedded = tmp_path / "embedded.h5ad"
    code, _, stderr = _run_cli(
        [
            "embed", _fixture_dir("v2") / "data.h5ad", "-o", embedded, "--key-added", "gf",
            "--checkpoint", _checkpoint(), "--precision", "fp32", *common,
        ]
    )  # fmt: skip
    assert code == 0, stderr
    direct = ad.read_h5ad(_fixture_dir("v2") / "data.h5ad")
    sck.tl.embed(direct, checkpoint=_checkpoint(), gene_key="ensembl_id", key_added="gf", **FP32)
    np.testing.assert_array_equal(ad.read_h5ad(embedded).obsm["X_gf"], direct.obsm["X_gf"])
