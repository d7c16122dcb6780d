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
    precision = _table(text, "| precision | cells/s")
    assert [r["precision"] for r in precision] == ["fp32", "bf16"]
    for r in precision:
        assert float(r["cells/s"]) > 0
        assert float(r["useful GFLOP/s"]) >= 0
        assert float(r["GEMM GFLOP/s"]) > 0
        assert float(r["fraction of GEMM"]) >= 0
        assert 0 < float(r["attention share of FLOPs"]) < 1
        assert float(r["attention kernel alone, fraction of GEMM"]) > 0
        assert (
            0
            < float(r["ceiling set by attention"])
            <= 1 / (1 - float(r["attention share of FLOPs"]))
        )
        assert float(r["min cosine to fp32"]) > 0.999
    assert "native bf16: " in text


def _table(text: str, header_start: str) -> list[dict[str, str]]:
    """Rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[at].strip("|").split("|")]
    rows = []
    for line in lines[at + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_useful_flops_counts_the_cls_path_only():
    bench = _import("embed_throughput")
    args = type("Args", (), {"embsize": 4, "d_hid": 8, "nlayers": 2})()
    # layer 1 on 3 tokens: 2*(4*16 + 2*32)*3 + 4*9*4; last layer: K,V of 3 tokens, the rest for
    # <cls> alone; value encoder on 3 tokens
    layer = 2 * (64 + 64) * 3 + 4 * 9 * 4
    last = 4 * 16 * 3 + 2 * (32 + 64) + 4 * 3 * 4
    value = 2 * (4 + 16) * 3
    assert bench.useful_flops(args, [3]) == layer + last + value
    assert bench.useful_flops(args, [3, 3]) == 2 * (layer + last + value)


def test_embed_throughput_profile_and_autocast_baseline(synthetic):
    from scdlkit.foundation import load_scgpt_model, resolve_checkpoint, tokenize_adata

    bench = _import("embed_throughput")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic.write_random_checkpoint(
            Path(tmp) / "c", embsize=16, nheads=2, d_hid=32, nlayers=2, n_vocab_genes=300
        )
        genes = synthetic.fake_gene_symbols(300)
        adata = synthetic.synthetic_adata(12, genes, min_expressed=10, max_expressed=80, seed=0)
        tokens, _ = tokenize_adata(adata, resolve_checkpoint(folder))
        model = load_scgpt_model(folder, device="cpu")
        cpu = torch.device("cpu")
        table = bench.profile_table(model, tokens, device=cpu, batch_size=4, autocast_baseline=True)
        rows = bench.precision_rows(
            model, tokens, device=cpu, batch_size=4, repeats=1, autocast_baseline=True
        )
    groups = {r["op group"]: r for r in _table(table, "| op group")}
    assert groups["total"]["fp32 %"] == "100"
    # a share, not milliseconds: a tiny model on a fast CPU rounds to 0.0 ms
    assert float(groups["matrix products (linear layers)"]["fp32 %"]) > 0
    # plain autocast casts weights on every call; the bf16 copy does not
    assert float(groups["casts and copies"]["bf16, plain autocast (before) %"]) > float(
        groups["casts and copies"]["bf16 %"]
    )
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "bf16, plain autocast (before)"]
    assert all(float(r["min cosine to fp32"]) > 0.999 for r in rows)


def test_gpu_check_dry_run(tmp_path):
    import os
    import subprocess

    script = BENCHMARKS / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(script), "--dry-run", "--cells", "8", "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    ).stdout
    assert out.startswith("dry run: tiny model on the CPU")
    rows = {r["check"].split(" (")[0]: r for r in _table(out, "| check | result")}
    assert len(rows) == 7

    def number(check, index=0):
        return float(rows[check]["result"].split()[index].replace(",", ""))

    assert number("embedding, bf16, 128 tokens/cell") > 0
    assert number("fixture: fp32 against upstream scGPT's embeddings", -1) < 1e-4
    assert number("fixture: bf16 against fp32", -1) > 0.9999
    assert number("full_finetune training, bf16") > 0
    assert number("lora training, bf16") > 0


def test_gpu_check_refuses_without_a_gpu():
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--dry-run" in done.stderr or "no CUDA" in done.stderr


def test_stream_memory_quick_table(tmp_path, capsys):
    bench = _import("stream_memory")
    args = ["--quick", "--n-cells", "60", "--chunk-size", "25", "--warm-cells", "10"]
    text = bench.main([*args, "--in-process", "--workdir", str(tmp_path)])
    assert text in capsys.readouterr().out
    rows = _table(text, "| cells | CSR size")
    assert [r["cells"] for r in rows] == ["60", "120"]
    for r in rows:
        assert float(r["cells/s"].replace(",", "")) > 0
        assert float(r["results"]) >= 0
        assert float(r["peak growth"]) >= float(r["retained after"]) - 1


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


def test_planted_signal_is_learned_by_the_encoder_and_the_baseline():
    """Issue 19's planted-signal data: 6 classes, each written in 6 marker genes."""
    from scdlkit.foundation import ScGPTAnnotationRunner, load_scgpt_model

    planted = _import("planted_signal")
    adata = planted.planted_signal_adata()
    assert adata.shape == (600, 600)
    assert adata.obs["cell_type"].value_counts().tolist() == [100] * 6
    assert (adata.var["marker_of"] != "").sum() == 36
    common = {
        "label_key": "cell_type",
        "checkpoint": planted.RANDOM_CHECKPOINT,
        "precision": "fp32",
        "progress": False,
        "random_state": 0,
    }
    baseline = ScGPTAnnotationRunner(strategies=("baseline",), **common).fit(adata)
    assert baseline.strategy_metrics_["test_accuracy"].iloc[0] >= 0.95
    # fitted alone, so the runner keeps its model; the defaults (300 steps at lr 1e-3, tuned on
    # validation cells by benchmarks/tune_defaults.py)
    runner = ScGPTAnnotationRunner(strategies=("full_finetune",), **common).fit(adata)
    assert runner.strategy_metrics_["test_accuracy"].iloc[0] >= 0.8
    # the step floor stretched 10 epochs of 6 batches to 300 steps
    assert runner.results_["full_finetune"].training["trainer"]["epochs"] >= 30
    # it learned by sending <cls>'s attention to the markers: uniform is about 6 / 127
    frozen = planted.cls_attention_on_markers(
        load_scgpt_model(planted.RANDOM_CHECKPOINT, device="cpu"), adata, planted.RANDOM_CHECKPOINT
    )
    tuned = planted.cls_attention_on_markers(
        runner.results_["full_finetune"].model.encoder, adata, planted.RANDOM_CHECKPOINT
    )
    assert len(frozen) == len(tuned) == 2
    assert all(0.02 < share < 0.1 for share in frozen)
    assert max(tuned) > 2 * max(frozen)


def test_planted_signal_run_reports_losses_and_attention_at_the_last_epoch():
    planted = _import("planted_signal")
    adata = planted.planted_signal_adata(n_cells=120)
    out = planted.run(
        adata,
        "cell_type",
        planted.RANDOM_CHECKPOINT,
        "ia3",
        0,
        training={"epochs": 3, "early_stopping_patience": None},
        attention=True,
        keep_last=True,
    )
    assert out["epochs_run"] == 3
    assert np.isfinite([out["train_loss"], out["inner_val_loss"], out["final_train_loss"]]).all()
    # both layers' <cls> attention on the markers, as shares of one
    assert 0 < out["cls_on_markers_l1"] < 1
    assert 0 < out["cls_on_markers_l2"] < 1
    frame = planted.table([out])
    assert {"final_train_loss", "cls_on_markers_l1", "cls_on_markers_l2"} <= set(frame.columns)


# ------------------------------------------------------------------ baseline_vs_celltypist.py


def test_baseline_vs_celltypist_without_celltypist_says_it_compares_a_rewrite(monkeypatch):
    bench = _import("baseline_vs_celltypist")
    monkeypatch.setitem(sys.modules, "celltypist", None)  # as if not installed
    module, line = bench.load_celltypist("auto")
    assert module is None
    assert "NOT CellTypist" in line
    assert "celltypist is not installed" in line
    with pytest.raises(SystemExit, match="not installed"):
        bench.load_celltypist("require")


def test_baseline_vs_celltypist_falls_back_when_celltypist_cannot_train(monkeypatch):
    bench = _import("baseline_vs_celltypist")

    def train(*args, **kwargs):  # CellTypist 1.7.1 under scikit-learn >= 1.8
        msg = "LogisticRegression.__init__() got an unexpected keyword argument 'multi_class'"
        raise TypeError(msg)

    fake = ModuleType("celltypist")
    fake.__version__ = "1.7.1"
    fake.train = train
    fake.logger = ModuleType("celltypist.logger")
    fake.logger.set_level = lambda level: None
    monkeypatch.setitem(sys.modules, "celltypist", fake)
    module, line = bench.load_celltypist("auto")
    assert module is None
    assert "NOT CellTypist" in line
    assert "cannot train with scikit-learn" in line
    assert "multi_class" in line


def test_baseline_vs_celltypist_fallback_table(capsys):
    bench = _import("baseline_vs_celltypist")
    text = bench.main(["--celltypist", "off", "--seeds", "0", "1", "--noise-genes", "50"])
    assert text in capsys.readouterr().out
    assert "NOT CellTypist" in text
    assert "bf16 flags: " in text
    assert "cores visible" in text
    rows = _table(text, "| seed |")
    assert [r["seed"] for r in rows] == ["0", "1", "mean ± sd"]
    assert set(rows[0]) == {c.replace("other", "rewrite") for c in bench.COLUMNS}
    for r in rows[:2]:
        assert int(r["query cells"]) > 90
        for key in ("baseline macro-F1", "rewrite macro-F1"):
            assert 0.4 < float(r[key]) <= 1
        for key in ("baseline accuracy", "rewrite accuracy"):
            assert 0.7 < float(r[key]) <= 1
        # the rewrite is the same multinomial fit as the baseline, so the labels agree
        assert float(r["label agreement %"]) >= 99
        assert r["prob match Unassigned %"] == "n/a"
    assert " ± " in rows[2]["baseline macro-F1"]
    assert "rewrite minus baseline, macro-F1" in text


def test_comparison_time_prints_the_call_and_each_strategy(capsys):
    bench = _import("comparison_time")
    assert bench.main(["--strategies", "frozen_probe", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "wall time of the call:" in out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["frozen_probe", "baseline"]
    assert "best (validation):" in out


# --------------------------------------------------------------------- refit_vs_celltypist.py


def test_refit_vs_celltypist_prints_the_refit_and_held_out_models_on_one_seed(capsys, monkeypatch):
    bench = _import("refit_vs_celltypist")
    monkeypatch.setitem(sys.modules, "celltypist", None)  # the rewrite path: no CellTypist column
    text = bench.main(
        ["--seeds", "0", "--noise-genes", "5", "--strategies", "baseline", "--celltypist", "off"]
    )
    assert "machine:" in text
    assert "scdlkit refit macro-F1" in text
    assert "scdlkit training split macro-F1" in text
    assert "CellTypist macro-F1" not in text
    assert "cells" in text  # what the saved model was fitted on


# ---------------------------------------------------------------------- conformal_coverage.py


def test_conformal_coverage_prints_coverage_per_part_on_one_seed():
    bench = _import("conformal_coverage")
    text = bench.main(
        [
            "--seeds",
            "0",
            "--strategies",
            "baseline",
            "--n-cells",
            "600",
            "--parts",
            "cells",
            "donors",
            "unseen",
        ]
    )
    assert "machine:" in text
    for part in ("cells:", "donors:", "unseen:"):
        assert part in text
    assert "coverage" in text
    assert "empty-set share" in text
