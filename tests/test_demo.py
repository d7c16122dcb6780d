"""The README's main command, ``make demo``, runs ``python -m scdlkit.demo``: its own code path,
on fewer cells and one epoch, so the command cannot break unseen."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import pytest

from scdlkit import demo

ROOT = Path(__file__).parents[1]


def test_make_demo_runs_the_module_these_tests_drive():
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    assert "-m scdlkit.demo" in recipe.group(1)
    assert "make demo" in (ROOT / "README.md").read_text()


def test_demo_strategies_name_each_strategy_once():
    assert len(demo.DEMO_STRATEGIES) == len(set(demo.DEMO_STRATEGIES))
    assert {"baseline", "lora"} <= set(demo.DEMO_STRATEGIES)


@pytest.fixture
def small_pbmc(monkeypatch, _pbmc_raw, tmp_path):
    """``sc.datasets.pbmc68k_reduced`` cut to 240 cells (with its scaled X and its .raw), and an
    empty checkpoint cache, so the demo takes its no-checkpoint path as on a fresh machine."""
    import scanpy as sc

    full = sc.datasets.pbmc68k_reduced()
    small = full[:240].copy()
    monkeypatch.setattr(sc.datasets, "pbmc68k_reduced", lambda: small.copy())
    monkeypatch.setenv("SCDLKIT_CACHE_DIR", str(tmp_path / "empty-cache"))
    return small


def test_demo_main_runs_end_to_end_with_its_default_strategies(small_pbmc, tmp_path, capsys):
    out = tmp_path / "scdlkit_demo"
    assert demo.main(["--output-dir", str(out), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in printed
    assert "best strategy:" in printed
    annotated = ad.read_h5ad(out / "pbmc_annotated.h5ad")
    uns = annotated.uns["scgpt_annotation"]
    assert list(uns["strategy_metrics"]["strategy"]) == list(demo.DEMO_STRATEGIES)
    assert uns["best_strategy"] in demo.DEMO_STRATEGIES
    assert (out / "report.md").is_file()
    assert (out / "runner" / "manifest.json").is_file()
    assert annotated.obs["scgpt_annotation"].notna().all()
    assert annotated.n_obs == small_pbmc.n_obs


def test_demo_main_drops_a_strategy_named_twice(small_pbmc, tmp_path, capsys):
    out = tmp_path / "twice"
    argv = ["--output-dir", str(out), "--epochs", "1", "--strategies", "baseline", "baseline"]
    assert demo.main(argv) == 0
    annotated = ad.read_h5ad(out / "pbmc_annotated.h5ad")
    assert list(annotated.uns["scgpt_annotation"]["strategy_metrics"]["strategy"]) == ["baseline"]
