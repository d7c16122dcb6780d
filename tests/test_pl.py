"""Tests of ``sck.pl``: plots check what was drawn, on hand-built ``adapt_annotation`` output."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

import scdlkit as sck
from scdlkit.pl._utils import BAR_COLOR, BASELINE_COLOR, BEST_COLOR

KEY = "scgpt_annotation"
LABEL_KEY = "cell_type"
CATS = ["B cell", "NK cell", "T cell"]
STRATEGIES = ["frozen_probe", "head", "lora", "baseline"]
BEST = "lora"
METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "auroc_ovr")


def _strategy_metrics() -> pd.DataFrame:
    rows = []
    for i, strategy in enumerate(STRATEGIES):
        row = {"strategy": strategy}
        for j, metric in enumerate(METRICS):
            row[f"validation_{metric}"] = 0.50 + 0.1 * i + 0.01 * j
            row[f"test_{metric}"] = 0.45 + 0.1 * i + 0.02 * j
        row["trainable_parameters"] = [0, 1_000, 5_000, 0][i]
        row["runtime_sec"] = 1.5 * (i + 1)
        rows.append(row)
    frame = pd.DataFrame(rows)
    # lora is the best on validation although baseline is higher on test: honest comparison
    frame.loc[frame["strategy"] == "frozen_probe", "test_auroc_ovr"] = np.nan
    return frame


def _history(n_epochs: int, offset: float) -> pd.DataFrame:
    epochs = np.arange(1, n_epochs + 1)
    return pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 1.5 / epochs + offset,
            "val_loss": 1.7 / epochs + offset,
            "val_accuracy": 0.5 + 0.05 * epochs,
            "val_macro_f1": 0.4 + 0.06 * epochs + offset,
            "lr": np.full(n_epochs, 1e-3),
            "seconds": np.full(n_epochs, 0.5),
        }
    )


def make_annotated(seed: int = 0) -> ad.AnnData:
    """The layout ``sck.tl.adapt_annotation`` writes, built by hand."""
    rng = np.random.default_rng(seed)
    n = 120
    split = np.array((["train"] * 6 + ["val"] * 2 + ["test"] * 2) * (n // 10), dtype=object)
    split[:8] = "unlabelled"
    true = rng.choice(CATS, size=n).astype(object)
    true[split == "unlabelled"] = np.nan
    pred = np.where(pd.isna(true), rng.choice(CATS, size=n), true).astype(object)
    flip = rng.random(n) < 0.25
    pred[flip] = rng.choice(CATS, size=int(flip.sum()))
    test_idx = np.flatnonzero(split == "test")
    pred[test_idx[:3]] = "Unknown"  # below the confidence threshold, only in the test split
    obs = pd.DataFrame(
        {
            LABEL_KEY: pd.Categorical(true, categories=CATS),
            KEY: pd.Categorical(pred, categories=[*CATS, "Unknown"]),
            f"{KEY}_confidence": rng.random(n).astype(np.float32),
            f"{KEY}_split": pd.Categorical(
                split, categories=["train", "val", "test", "unlabelled"]
            ),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(X=np.zeros((n, 4), dtype=np.float32), obs=obs)
    adata.uns[KEY] = {
        "params": {
            "label_key": LABEL_KEY,
            "strategies": list(STRATEGIES),
            "checkpoint": "whole-human",
            "random_state": 42,
        },
        "best_strategy": BEST,
        "strategy_metrics": _strategy_metrics(),
        "label_categories": list(CATS),
        "history": {"head": _history(4, 0.1), "lora": _history(6, 0.0)},
        "runner_dir": "runs/pbmc/runner",
        "versions": {"scdlkit": "0.0.0"},
    }
    return adata


def _batch_metrics_frame() -> pd.DataFrame:
    rows = []
    for i, strategy in enumerate(STRATEGIES):
        for j, batch in enumerate(["donor_a", "donor_b", "donor_c"]):
            if strategy == "frozen_probe" and batch == "donor_c":
                continue  # missing combination -> empty bar labelled n/a
            rows.append(
                {
                    "strategy": strategy,
                    "batch": batch,
                    "n_cells": 10 * (j + 1),
                    "accuracy": 0.6 + 0.05 * i + 0.01 * j,
                    "macro_f1": 0.5 + 0.06 * i + 0.02 * j,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def _h5ad_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    adata = make_annotated()
    adata.uns[KEY]["batch_metrics"] = _batch_metrics_frame()
    path = tmp_path_factory.mktemp("pl") / "annotated.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def _read_back(_h5ad_path: Path) -> ad.AnnData:
    return ad.read_h5ad(_h5ad_path)


@pytest.fixture(params=["memory", "h5ad"])
def adata(request: pytest.FixtureRequest, _read_back: ad.AnnData) -> ad.AnnData:
    """Annotated AnnData, as built and after a write_h5ad/read_h5ad round trip."""
    if request.param == "h5ad":
        assert isinstance(_read_back.uns[KEY]["label_categories"], np.ndarray)
        return _read_back.copy()
    adata = make_annotated()
    adata.uns[KEY]["batch_metrics"] = _batch_metrics_frame()
    return adata


@pytest.fixture
def adata_mem() -> ad.AnnData:
    """Annotated AnnData in memory (for the conventions, which do not depend on the storage)."""
    adata = make_annotated()
    adata.uns[KEY]["batch_metrics"] = _batch_metrics_frame()
    return adata


def _bars(ax) -> list:
    return [patch for container in ax.containers for patch in container.patches]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


# --------------------------------------------------------------------------- strategy_comparison


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("split", ["test", "validation"])
def test_strategy_comparison_draws_metric(adata, metric, split, tmp_path):
    fig = sck.pl.strategy_comparison(adata, metric=metric, split=split, return_fig=True)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == len(STRATEGIES)

    expected = _strategy_metrics()[f"{split}_{metric}"].to_numpy(dtype=float)
    widths = np.array([bar.get_width() for bar in bars])
    np.testing.assert_allclose(widths, np.nan_to_num(expected, nan=0.0))
    annotations = _texts(ax)
    for value in expected:
        assert ("n/a" if np.isnan(value) else f"{value:.3f}") in annotations

    colors = {s: bar.get_facecolor() for s, bar in zip(STRATEGIES, bars, strict=True)}
    assert colors[BEST] == to_rgba(BEST_COLOR)
    assert colors["baseline"] == to_rgba(BASELINE_COLOR)
    assert colors["head"] == colors["frozen_probe"] == to_rgba(BAR_COLOR)
    assert len({colors[BEST], colors["baseline"], colors["head"]}) == 3
    assert bars[STRATEGIES.index("baseline")].get_hatch()
    assert not bars[STRATEGIES.index("head")].get_hatch()

    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{s} (best)" if s == BEST else s for s in STRATEGIES]
    xlabel = ax.get_xlabel()
    assert split in xlabel
    assert {"macro_f1": "F1", "auroc_ovr": "AUROC"}.get(metric, metric.replace("_", " ")) in xlabel

    if metric == "macro_f1" and split == "test":
        out = tmp_path / "comparison.png"
        fig.savefig(out, dpi=50)
        assert out.stat().st_size > 0


def test_strategy_comparison_nan_is_na(adata):
    fig = sck.pl.strategy_comparison(adata, metric="auroc_ovr", return_fig=True)
    ax = fig.axes[0]
    frozen = _bars(ax)[STRATEGIES.index("frozen_probe")]
    assert frozen.get_width() == 0.0
    assert "n/a" in _texts(ax)


def test_strategy_comparison_val_alias(adata):
    a = sck.pl.strategy_comparison(adata, split="val", return_fig=True)
    b = sck.pl.strategy_comparison(adata, split="validation", return_fig=True)
    wa = [bar.get_width() for bar in _bars(a.axes[0])]
    wb = [bar.get_width() for bar in _bars(b.axes[0])]
    assert wa == wb
    assert "validation" in a.axes[0].get_xlabel()


def test_strategy_comparison_best_can_be_baseline(adata):
    adata.uns[KEY]["best_strategy"] = "baseline"
    fig = sck.pl.strategy_comparison(adata, return_fig=True)
    bars = _bars(fig.axes[0])
    baseline = bars[STRATEGIES.index("baseline")]
    assert baseline.get_facecolor() == to_rgba(BEST_COLOR)
    assert baseline.get_hatch()  # still marked as the non-foundation baseline
    assert bars[STRATEGIES.index(BEST)].get_facecolor() == to_rgba(BAR_COLOR)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"metric": "f1"}, "metric='f1'"), ({"split": "train"}, "split='train'")],
)
def test_strategy_comparison_bad_arguments(adata, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sck.pl.strategy_comparison(adata, **kwargs)


def test_strategy_comparison_missing_metrics(adata):
    del adata.uns[KEY]["strategy_metrics"]
    with pytest.raises(KeyError, match=r"strategy_metrics.*sck\.tl\.adapt_annotation"):
        sck.pl.strategy_comparison(adata)


# --------------------------------------------------------------------------- confusion_matrix


def _expected_matrix(adata, split, columns, normalize=True):
    """Rows: the label categories; columns: ``columns``; computed with ``pd.crosstab``."""
    obs = adata.obs
    mask = obs[LABEL_KEY].notna().to_numpy()
    if split != "all":
        mask &= (obs[f"{KEY}_split"].astype(str) == split).to_numpy()
    true = obs[LABEL_KEY].astype(str).to_numpy()[mask]
    pred = obs[KEY].astype(str).to_numpy()[mask]
    counts = (
        pd.crosstab(pd.Series(true, name="true"), pd.Series(pred, name="pred"))
        .reindex(index=CATS, columns=columns, fill_value=0)
        .to_numpy()
    )
    if not normalize:
        return counts
    return counts / counts.sum(axis=1, keepdims=True)


def test_confusion_matrix_normalised_test_split(adata, tmp_path):
    fig = sck.pl.confusion_matrix(adata, return_fig=True)
    ax = fig.axes[0]
    assert len(ax.images) == 1
    columns = [*CATS, "Unknown"]  # "Unknown" predicted in the test split
    drawn = np.ma.getdata(ax.images[0].get_array())
    np.testing.assert_allclose(drawn, _expected_matrix(adata, "test", columns))
    np.testing.assert_allclose(drawn.sum(axis=1), 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == columns
    assert [t.get_text() for t in ax.get_yticklabels()] == CATS
    assert len(ax.texts) == len(CATS) * len(columns)
    assert LABEL_KEY in ax.get_ylabel()
    assert KEY in ax.get_xlabel()
    out = tmp_path / "confusion.png"
    fig.savefig(out, dpi=50)
    assert out.stat().st_size > 0


@pytest.mark.parametrize("split", ["train", "val", "validation"])
def test_confusion_matrix_other_splits_without_unknown(adata, split):
    fig = sck.pl.confusion_matrix(adata, split=split, return_fig=True)
    ax = fig.axes[0]
    expected = _expected_matrix(adata, {"validation": "val"}.get(split, split), CATS)
    np.testing.assert_allclose(np.ma.getdata(ax.images[0].get_array()), expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == CATS


def test_confusion_matrix_counts_all_labelled(adata):
    fig = sck.pl.confusion_matrix(adata, split="all", normalize=False, return_fig=True)
    ax = fig.axes[0]
    drawn = np.ma.getdata(ax.images[0].get_array())
    expected = _expected_matrix(adata, "all", [*CATS, "Unknown"], normalize=False)
    np.testing.assert_array_equal(drawn, expected)
    assert drawn.sum() == adata.obs[LABEL_KEY].notna().sum()  # unlabelled cells left out
    assert str(int(expected[0, 0])) in _texts(ax)


def test_confusion_matrix_many_classes_not_annotated():
    n_classes = 22
    cats = [f"type{i:02d}" for i in range(n_classes)]
    labels = np.repeat(cats, 3)
    obs = pd.DataFrame(
        {
            LABEL_KEY: pd.Categorical(labels, categories=cats),
            KEY: pd.Categorical(np.roll(labels, 1), categories=cats),
            f"{KEY}_split": pd.Categorical(["test"] * len(labels)),
        }
    )
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(X=np.zeros((len(labels), 2), dtype=np.float32), obs=obs)
    adata.uns[KEY] = {"params": {"label_key": LABEL_KEY}, "label_categories": np.array(cats)}
    fig = sck.pl.confusion_matrix(adata, return_fig=True)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (n_classes, n_classes)
    assert len(ax.texts) == 0


def test_confusion_matrix_explicit_label_key(adata):
    adata.obs["truth"] = adata.obs[LABEL_KEY]
    del adata.uns[KEY]["params"]["label_key"]
    with pytest.raises(KeyError, match="label_key"):
        sck.pl.confusion_matrix(adata)
    fig = sck.pl.confusion_matrix(adata, label_key="truth", return_fig=True)
    assert "truth" in fig.axes[0].get_ylabel()


def test_confusion_matrix_errors(adata):
    with pytest.raises(ValueError, match="split='unlabelled'"):
        sck.pl.confusion_matrix(adata, split="unlabelled")
    del adata.obs[f"{KEY}_split"]
    with pytest.raises(KeyError, match=rf"{KEY}_split.*sck\.tl\.adapt_annotation"):
        sck.pl.confusion_matrix(adata)
    sck.pl.confusion_matrix(adata, split="all")  # needs no split column


# --------------------------------------------------------------------------- training_history


def test_training_history_loss(adata, tmp_path):
    fig = sck.pl.training_history(adata, return_fig=True)
    ax = fig.axes[0]
    lines = ax.get_lines()
    trained = ["head", "lora"]
    assert len(lines) == 2 * len(trained)
    expected = {"head": _history(4, 0.1), "lora": _history(6, 0.0)}
    for i, strategy in enumerate(trained):
        train, val = lines[2 * i], lines[2 * i + 1]
        np.testing.assert_allclose(train.get_xdata(), expected[strategy]["epoch"])
        np.testing.assert_allclose(train.get_ydata(), expected[strategy]["train_loss"])
        np.testing.assert_allclose(val.get_ydata(), expected[strategy]["val_loss"])
        assert train.get_linestyle() == "-"
        assert val.get_linestyle() == "--"
        assert train.get_color() == val.get_color()
    assert lines[0].get_color() != lines[2].get_color()
    assert lines[2].get_linewidth() > lines[0].get_linewidth()  # best strategy drawn thicker
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["head", "lora (best)", "train", "validation"]
    assert ax.get_xlabel() == "epoch"
    out = tmp_path / "history.png"
    fig.savefig(out, dpi=50)
    assert out.stat().st_size > 0


def test_training_history_metric_and_selection(adata):
    fig = sck.pl.training_history(adata, metric="macro_f1", strategies=["lora"], return_fig=True)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), _history(6, 0.0)["val_macro_f1"])
    assert "macro F1" in ax.get_ylabel()
    fig = sck.pl.training_history(adata, metric="lr", return_fig=True)
    assert len(fig.axes[0].get_lines()) == 2


def test_training_history_errors(adata):
    with pytest.raises(ValueError, match="frozen_probe"):
        sck.pl.training_history(adata, strategies=["frozen_probe"])
    with pytest.raises(ValueError, match="metric='auroc'"):
        sck.pl.training_history(adata, metric="auroc")
    adata.uns[KEY]["history"] = {}
    with pytest.raises(ValueError, match="no training history was recorded"):
        sck.pl.training_history(adata)
    del adata.uns[KEY]["history"]
    with pytest.raises(KeyError, match=r"history.*sck\.tl\.adapt_annotation"):
        sck.pl.training_history(adata)


# --------------------------------------------------------------------------- batch_metrics


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_batch_metrics_grouped_bars(adata, metric, tmp_path):
    fig = sck.pl.batch_metrics(adata, metric=metric, return_fig=True)
    ax = fig.axes[0]
    batches = ["donor_a", "donor_b", "donor_c"]
    assert len(ax.containers) == len(STRATEGIES)
    assert len(_bars(ax)) == len(STRATEGIES) * len(batches)
    frame = _batch_metrics_frame()
    for strategy, container in zip(STRATEGIES, ax.containers, strict=True):
        rows = frame[frame["strategy"] == strategy].set_index("batch")[metric]
        expected = rows.reindex(batches).fillna(0.0).to_numpy()
        np.testing.assert_allclose([bar.get_height() for bar in container.patches], expected)
    assert "n/a" in _texts(ax)  # frozen_probe has no value for donor_c
    baseline = ax.containers[STRATEGIES.index("baseline")].patches[0]
    assert baseline.get_hatch()
    assert baseline.get_facecolor() == to_rgba(BASELINE_COLOR)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["donor_a\n(n=10)", "donor_b\n(n=20)", "donor_c\n(n=30)"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{s} (best)" if s == BEST else s for s in STRATEGIES]
    if metric == "macro_f1":
        out = tmp_path / "batches.png"
        fig.savefig(out, dpi=50)
        assert out.stat().st_size > 0


def test_batch_metrics_missing(adata):
    del adata.uns[KEY]["batch_metrics"]
    with pytest.raises(KeyError, match="split_by='batch'"):
        sck.pl.batch_metrics(adata)


def test_batch_metrics_bad_metric(adata):
    with pytest.raises(ValueError, match="metric='auroc_ovr'"):
        sck.pl.batch_metrics(adata, metric="auroc_ovr")


# --------------------------------------------------------------------------- conventions

PLOTS = [
    sck.pl.strategy_comparison,
    sck.pl.confusion_matrix,
    sck.pl.training_history,
    sck.pl.batch_metrics,
]
PLOT_IDS = [f.__name__ for f in PLOTS]


@pytest.mark.parametrize("plot", PLOTS, ids=PLOT_IDS)
def test_draws_into_given_axes(adata_mem, plot):
    fig, (left, right) = plt.subplots(1, 2)
    assert plot(adata_mem, ax=right, show=False) is None
    assert not left.has_data()
    assert right.has_data()
    assert plot(adata_mem, ax=left, show=False, return_fig=True) is fig
    assert left.has_data()


@pytest.mark.parametrize("plot", PLOTS, ids=PLOT_IDS)
def test_return_fig_and_save(adata_mem, plot, tmp_path):
    fig = plot(adata_mem, return_fig=True)
    assert isinstance(fig, Figure)
    out = tmp_path / f"{plot.__name__}.png"
    assert plot(adata_mem, save=out) is None
    assert out.stat().st_size > 0
    assert plt.get_fignums() == [fig.number]  # the saved, unreturned figure was closed


@pytest.mark.parametrize("plot", PLOTS, ids=PLOT_IDS)
def test_show_follows_scanpy(adata_mem, plot, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    plot(adata_mem)  # show=None: Agg, non-interactive -> not shown
    plot(adata_mem, show=True, return_fig=True)
    assert shown == [True]
    monkeypatch.setattr(matplotlib, "is_interactive", lambda: True)
    plot(adata_mem)  # as in a notebook
    plot(adata_mem, return_fig=True)  # returned figures are not shown by default
    assert shown == [True, True]


@pytest.mark.parametrize("plot", PLOTS, ids=PLOT_IDS)
def test_missing_key_names_the_tool(adata, plot):
    with pytest.raises(KeyError, match=r"'other'.*sck\.tl\.adapt_annotation.*key_added='other'"):
        plot(adata, key="other")


@pytest.mark.parametrize("plot", PLOTS, ids=PLOT_IDS)
def test_plots_leave_adata_unchanged(adata_mem, plot):
    before = adata_mem.copy()
    plot(adata_mem, return_fig=True)
    assert list(adata_mem.obs.columns) == list(before.obs.columns)
    pd.testing.assert_frame_equal(adata_mem.obs, before.obs)
    for name in ("strategy_metrics", "batch_metrics"):
        pd.testing.assert_frame_equal(adata_mem.uns[KEY][name], before.uns[KEY][name])
    assert set(adata_mem.uns[KEY]) == set(before.uns[KEY])


_NOISE_LABELS = {
    "sd": "± 1 sd over repeats",
    "t": "95% t interval over repeats (corrected)",
    "boot": "95% bootstrap over test cells (one model)",
}


@pytest.mark.parametrize("noise", ["sd", "t", "boot"])
def test_strategy_comparison_draws_error_bars(adata_mem, noise, tmp_path):
    from matplotlib.container import BarContainer, ErrorbarContainer

    frame = adata_mem.uns[KEY]["strategy_metrics"].copy()
    values = frame["test_macro_f1"].to_numpy(dtype=float)
    frame["test_macro_f1_sd"] = [0.01, 0.02, 0.03, 0.04]
    if noise == "sd":
        low, high = values - frame["test_macro_f1_sd"], values + frame["test_macro_f1_sd"]
    else:
        if noise == "boot":
            del frame["test_macro_f1_sd"]
        frame[f"test_macro_f1_{noise}_ci_low"] = values - 0.05
        frame[f"test_macro_f1_{noise}_ci_high"] = values + np.array([0.01, 0.02, 0.03, 0.04])
        low = frame[f"test_macro_f1_{noise}_ci_low"]
        high = frame[f"test_macro_f1_{noise}_ci_high"]
    adata_mem.uns[KEY]["strategy_metrics"] = frame
    fig = sck.pl.strategy_comparison(adata_mem, return_fig=True)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    assert bars[0].get_label() == _NOISE_LABELS[noise]
    (segments,) = bars[0].lines[2]
    ends = np.array([seg[:, 0] for seg in segments.get_segments()])
    np.testing.assert_allclose(ends[:, 0], low)
    np.testing.assert_allclose(ends[:, 1], high)
    assert len([c for c in ax.containers if isinstance(c, BarContainer)]) == 1
    out = tmp_path / "noise.png"
    fig.savefig(out, dpi=50)
    assert out.stat().st_size > 0


def test_strategy_comparison_without_noise_columns_draws_no_error_bars(adata_mem):
    from matplotlib.container import ErrorbarContainer

    fig = sck.pl.strategy_comparison(adata_mem, return_fig=True)
    assert not [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
