"""Label transfer as CellTypist users expect it: thresholds and probabilities at annotate time,
majority voting, marker genes (coefficients and integrated gradients), and their plots."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import scdlkit as sck
from scdlkit.cli import build_parser, main
from scdlkit.tl._labelling import probability_columns

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}


# --------------------------------------------------------------------- annotate-time options


def test_probabilities_are_a_dataframe_of_the_categories_through_h5ad_and_zarr(
    annotated, baseline_runner, tmp_path
):
    categories = list(baseline_runner.label_categories_)
    annotated.write_h5ad(tmp_path / "a.h5ad")
    annotated.write_zarr(tmp_path / "a.zarr")
    for back in (ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_zarr(tmp_path / "a.zarr")):
        probs = back.obsm[f"{KEY}_probabilities"]
        assert isinstance(probs, pd.DataFrame)
        # '/' is not allowed in zarr column names: "CD4+/CD25 T Reg" is stored as "CD4+_CD25 ..."
        assert list(probs.columns) == probability_columns(categories)
        assert [c.replace("/", "_") for c in back.uns[KEY]["label_categories"]] == list(
            probs.columns
        )
        assert list(probs.index) == list(back.obs_names)
        np.testing.assert_allclose(probs.to_numpy().sum(axis=1), 1.0, atol=1e-5)
        # the label is the most probable class, its confidence that probability
        top = np.asarray(categories, dtype=object)[probs.to_numpy().argmax(axis=1)]
        assert (back.obs[KEY].astype(str).to_numpy() == top).all()
        np.testing.assert_allclose(
            back.obs[f"{KEY}_confidence"], probs.to_numpy().max(axis=1), rtol=1e-6
        )


def test_probability_columns_keep_names_without_slashes():
    assert probability_columns(["B", "CD4+/CD25 T Reg", "CD4+_CD25 T Reg"]) == [
        "B",
        "CD4+_CD25 T Reg",
        "CD4+_CD25 T Reg_",
    ]


def test_probabilities_false_skips_and_removes_the_matrix(annotated, baseline_runner):
    adata = annotated.copy()
    sck.tl.annotate(adata, baseline_runner, probabilities=False)
    assert f"{KEY}_probabilities" not in adata.obsm
    assert adata.uns[KEY]["params"]["probabilities"] is False


def test_threshold_at_annotate_time_sets_the_share_of_unknown(annotated, baseline_runner):
    confidence = annotated.obs[f"{KEY}_confidence"].to_numpy()
    assert baseline_runner.confidence_threshold is None
    assert "Unknown" not in set(annotated.obs[KEY].astype(str))  # the runner's default: none
    shares = []
    for threshold in np.quantile(confidence, [0.1, 0.3, 0.6]).round(4):
        adata = annotated.copy()
        sck.tl.annotate(adata, baseline_runner, confidence_threshold=threshold, unknown_label="?")
        labels = adata.obs[KEY]
        unknown = (labels == "?").to_numpy()
        # exactly the cells under the threshold; the others keep their label
        assert (unknown == (confidence < threshold)).all()
        kept = ~unknown
        assert (labels[kept].astype(str) == annotated.obs[KEY][kept].astype(str)).all()
        assert list(labels.cat.categories) == [*baseline_runner.label_categories_, "?"]
        assert adata.uns[KEY]["params"]["confidence_threshold"] == threshold
        shares.append(unknown.mean())
    np.testing.assert_allclose(shares, [0.1, 0.3, 0.6], atol=0.02)


def test_threshold_default_is_the_runners(annotated, baseline_runner, monkeypatch):
    adata = annotated.copy()
    monkeypatch.setattr(baseline_runner, "confidence_threshold", 0.8)
    sck.tl.annotate(adata, baseline_runner)
    low = annotated.obs[f"{KEY}_confidence"].to_numpy() < 0.8
    assert ((adata.obs[KEY] == "Unknown").to_numpy() == low).all()
    adata = annotated.copy()
    sck.tl.annotate(adata, baseline_runner, confidence_threshold=0.0)
    assert not (adata.obs[KEY] == "Unknown").any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"min_prop": -0.1}, "min_prop"),
        ({"unknown_label": ""}, "unknown_label"),
        ({"over_clustering": "louvain"}, "majority_voting=True"),
        ({"majority_voting": True, "over_clustering": "nope"}, "not a column"),
        ({"majority_voting": True, "over_clustering": [1, 2]}, "one cluster per cell"),
    ],
)
def test_bad_labelling_options_fail_before_work(_pbmc_raw, baseline_runner, kwargs, match):
    adata = _pbmc_raw.copy()
    before = adata.copy()
    with pytest.raises((ValueError, KeyError), match=match):
        sck.tl.annotate(adata, baseline_runner, **kwargs)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert list(adata.obsm.keys()) == list(before.obsm.keys())


def test_unknown_label_may_not_be_a_class(_pbmc_raw, baseline_runner):
    with pytest.raises(ValueError, match="one of the runner's classes"):
        sck.tl.annotate(
            _pbmc_raw.copy(), baseline_runner, confidence_threshold=0.5, unknown_label="CD19+ B"
        )


def test_backed_query_streams_the_new_options(_pbmc_raw, baseline_runner, annotated, tmp_path):
    path = tmp_path / "q.h5ad"
    _pbmc_raw.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    sck.tl.annotate(
        backed,
        baseline_runner,
        chunk_size=128,
        confidence_threshold=0.5,
        majority_voting=True,
        over_clustering="louvain",
    )
    probs = backed.obsm[f"{KEY}_probabilities"]
    np.testing.assert_allclose(
        probs.to_numpy(), annotated.obsm[f"{KEY}_probabilities"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert backed.obs[f"{KEY}_majority_voting"].notna().all()
    backed.file.close()


def test_probabilities_under_the_real_class_names(annotated, baseline_runner, tmp_path):
    """The stored columns have ``/`` as ``_`` (zarr refuses ``/``); the reader and the
    documented one-liner give the real names back, before and after a round trip."""
    from scdlkit.pl._probabilities import annotation_probabilities

    name = "CD4+/CD25 T Reg"
    assert name in baseline_runner.label_categories_
    stored = annotated.obsm[f"{KEY}_probabilities"]
    assert name not in stored.columns
    assert "CD4+_CD25 T Reg" in stored.columns
    annotated.write_zarr(tmp_path / "a.zarr")
    annotated.write_h5ad(tmp_path / "a.h5ad")
    for adata in (annotated, ad.read_zarr(tmp_path / "a.zarr"), ad.read_h5ad(tmp_path / "a.h5ad")):
        probs = annotation_probabilities(adata)
        assert list(probs.columns) == list(baseline_runner.label_categories_)
        np.testing.assert_array_equal(probs[name], stored["CD4+_CD25 T Reg"])
        assert list(probs.index) == list(adata.obs_names)
        # the one-liner of docs/outputs.md
        by_hand = adata.obsm[f"{KEY}_probabilities"].set_axis(
            adata.uns[KEY]["label_categories"], axis=1
        )
        pd.testing.assert_frame_equal(by_hand, probs, check_dtype=False)


def test_probabilities_reader_refuses_what_does_not_match(annotated, _pbmc_raw):
    from scdlkit.pl._probabilities import annotation_probabilities

    with pytest.raises(KeyError, match=r"sck.tl.annotate\(adata, runner"):
        annotation_probabilities(_pbmc_raw)
    adata = annotated.copy()
    adata.obsm[f"{KEY}_probabilities"] = adata.obsm[f"{KEY}_probabilities"].iloc[:, 1:]
    with pytest.raises(ValueError, match="do not match"):
        annotation_probabilities(adata)


# ------------------------------------------------------------------------- runner argument


def test_an_anndata_as_the_runner_names_what_to_pass(annotated, _pbmc_raw, baseline_runner):
    query = _pbmc_raw.copy()
    before = list(query.obs.columns)
    folder = str(annotated.uns[KEY]["runner_dir"])
    with pytest.raises(
        TypeError, match=r"runner= is an AnnData.*ref.uns\['scgpt_annotation'\]"
    ) as err:
        sck.tl.annotate(query, annotated)
    assert folder in str(err.value)
    with pytest.raises(TypeError, match=r"sck\.tl\.adapt_annotation"):
        sck.tl.annotate(query, _pbmc_raw)  # no record: the tools that write one
    with pytest.raises(TypeError, match="runner= is an AnnData"):
        sck.tl.annotation_markers(annotated.copy(), runner=_pbmc_raw)
    assert list(query.obs.columns) == before
    sck.tl.annotate(query, annotated.uns[KEY])  # what the message says works
    assert (query.obs[KEY] == annotated.obs[KEY]).all()


def test_an_output_dir_as_the_runner_points_to_its_runner_folder(
    annotated, _pbmc_raw, baseline_runner, tmp_path
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(baseline_runner.runner_dir_, run / "runner")
    query = _pbmc_raw.copy()
    with pytest.raises(FileNotFoundError, match=r"looks like the output_dir.*run/runner"):
        sck.tl.annotate(query, str(run))
    assert KEY not in query.obs
    with pytest.raises(FileNotFoundError, match="run/runner"):
        sck.tl.annotation_markers(annotated.copy(), runner=run)
    sck.tl.annotate(query, run / "runner")
    assert query.obs[KEY].notna().all()


def test_plots_of_a_query_name_the_tool_it_needs(annotated, _pbmc_raw):
    with pytest.raises(KeyError, match=r"sck.tl.annotate\(adata, runner"):
        sck.pl.confusion_matrix(_pbmc_raw.copy(), label_key="bulk_labels", split="all")
    with pytest.raises(KeyError, match=r"labelled by sck.tl.annotate \(a query\)"):
        sck.pl.strategy_comparison(annotated)
    with pytest.raises(KeyError, match=r"labelled by sck.tl.annotate \(a query\)"):
        sck.pl.training_history(annotated)
    fig = sck.pl.confusion_matrix(annotated, label_key="bulk_labels", split="all", return_fig=True)
    plt.close(fig)


# ---------------------------------------------------------------------------------- CLI


def test_cli_annotate_carries_the_labelling_options(_pbmc_raw, baseline_runner, tmp_path):
    args = build_parser().parse_args(
        [
            "annotate",
            "q.h5ad",
            "--runner",
            "r",
            "-o",
            "o.h5ad",
            "--confidence-threshold",
            "0.6",
            "--unknown-label",
            "unsure",
            "--majority-voting",
            "--over-clustering",
            "louvain",
            "--min-prop",
            "0.4",
            "--no-probabilities",
        ]
    )
    assert (args.confidence_threshold, args.unknown_label, args.min_prop) == (0.6, "unsure", 0.4)
    assert args.majority_voting
    assert args.over_clustering == "louvain"
    assert args.probabilities is False
    defaults = build_parser().parse_args(["annotate", "q.h5ad", "--runner", "r", "-o", "o"])
    assert defaults.confidence_threshold is None
    assert defaults.probabilities is True
    assert not defaults.majority_voting
    assert defaults.min_prop == 0.0

    query = tmp_path / "query.h5ad"
    _pbmc_raw.write_h5ad(query)
    out = tmp_path / "out.h5ad"
    argv = [
        "annotate",
        str(query),
        "--runner",
        str(baseline_runner.runner_dir_),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--confidence-threshold",
        "0.6",
        "--unknown-label",
        "unsure",
        "--majority-voting",
        "--min-prop",
        "0.4",
        "-q",
    ]
    assert main(argv) == 0
    result = ad.read_h5ad(out)
    confidence = result.obs[f"{KEY}_confidence"].to_numpy()
    assert ((result.obs[KEY] == "unsure").to_numpy() == (confidence < 0.6)).all()
    assert result.obs[f"{KEY}_majority_voting"].notna().all()
    assert f"{KEY}_probabilities" in result.obsm
    assert main([*argv[:-1], "--min-prop", "2", "-q"]) == 2  # out of range: a usage error


# ---------------------------------------------------------------------------------- plots


def _png_ok(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.shape[0] > 100
    assert image[..., :3].std() > 0.05  # something was drawn


def test_label_transfer_plot_draws_shares_and_confidences(annotated, tmp_path):
    from scdlkit.pl._label_transfer import MAX_DOT_SIZE, label_transfer_table

    fig = sck.pl.label_transfer(annotated, "louvain", return_fig=True, show=False)
    share, confidence = label_transfer_table(annotated, "louvain", predicted_key=KEY)
    np.testing.assert_allclose(share.sum(axis=1), 1.0)
    ax = fig.axes[0]
    dots = ax.collections[0]
    i, j = np.nonzero(share.to_numpy() > 0)
    # one dot per (group, label) pair with cells, where it belongs, sized and coloured by it
    np.testing.assert_allclose(dots.get_offsets(), np.column_stack([j, i]))
    np.testing.assert_allclose(dots.get_sizes(), share.to_numpy()[i, j] * MAX_DOT_SIZE)
    np.testing.assert_allclose(dots.get_array(), confidence.to_numpy()[i, j])
    # check one value by hand: louvain group "0"'s cells and their labels
    group = annotated.obs["louvain"] == share.index[0]
    label = share.columns[np.argmax(share.iloc[0].to_numpy())]
    picked = group & (annotated.obs[KEY] == label)
    assert share.iloc[0][label] == pytest.approx(picked.sum() / group.sum())
    assert confidence.iloc[0][label] == pytest.approx(
        annotated.obs.loc[picked, f"{KEY}_confidence"].mean(), rel=1e-5
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == list(share.columns)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(share.index)
    assert fig.axes[1].get_ylabel() == "mean confidence"  # the colorbar
    fig.savefig(tmp_path / "lt.png")
    _png_ok(tmp_path / "lt.png")
    plt.close(fig)


def test_label_transfer_plot_into_given_axes_with_majority_voting(annotated, baseline_runner):
    adata = annotated.copy()
    sck.tl.annotate(adata, baseline_runner, majority_voting=True, over_clustering="louvain")
    fig, ax = plt.subplots()
    assert sck.pl.label_transfer(adata, "bulk_labels", majority_voting=True, ax=ax) is None
    # voted per louvain cluster: each louvain cluster would be one dot; here rows are bulk labels
    assert ax.get_xlabel() == f"predicted ({KEY}_majority_voting)"
    assert len(ax.collections[0].get_offsets()) > 0
    plt.close(fig)
    with pytest.raises(KeyError, match="reference_key"):
        sck.pl.label_transfer(adata, "nope")


# ------------------------------------------------------------------------- normalisation


def _log1p_to(counts: np.ndarray, total: float) -> np.ndarray:
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * total)


def test_describe_normalisation_tells_counts_log1p_and_other():
    from scdlkit.foundation._normalisation import describe_normalisation

    counts = np.random.default_rng(0).poisson(2.0, size=(300, 50)).astype(np.float32) + 1
    described = describe_normalisation(ad.AnnData(counts), None)
    assert described["kind"] == "counts"
    assert described["typical_total"] == pytest.approx(np.median(counts.sum(axis=1)))
    log = describe_normalisation(ad.AnnData(_log1p_to(counts, 1e4)), None)
    assert log["kind"] == "log1p"
    assert log["target_sum"] == pytest.approx(1e4, rel=1e-4)
    subset = describe_normalisation(ad.AnnData(_log1p_to(counts, 1e4)[:, :20]), None)
    assert subset["kind"] == "log1p"
    assert subset["target_sum"] is None  # a gene subset: no fixed total
    cpm = describe_normalisation(ad.AnnData(counts / counts.sum(1, keepdims=True) * 1e6), None)
    assert cpm["kind"] == "other"


def test_normalisation_mismatch_names_both_only_when_it_matters():
    from scdlkit.foundation._normalisation import normalisation_mismatch

    counts = {"kind": "counts", "typical_total": 2500.0, "target_sum": None}
    log_1e4 = {"kind": "log1p", "typical_total": 1e4, "target_sum": 1e4}
    log_cpm = {"kind": "log1p", "typical_total": 1e6, "target_sum": 1e6}
    subset = {"kind": "log1p", "typical_total": 3000.0, "target_sum": None}
    other = {"kind": "other", "typical_total": 1e6, "target_sum": None}
    assert normalisation_mismatch(counts, log_1e4) is None  # counts are normalised to 1e4
    assert normalisation_mismatch(log_1e4, subset) is None  # unknown total: not compared
    assert normalisation_mismatch(None, other) is None  # a runner saved before it was recorded
    message = normalisation_mismatch(log_1e4, log_cpm)
    assert "log1p-normalised to 10,000" in message
    assert "log1p-normalised to 1,000,000" in message
    message = normalisation_mismatch(counts, other)
    assert "raw counts (median 2,500 per cell)" in message
    assert "neither counts nor log1p" in message


def test_annotate_warns_once_when_the_query_is_normalised_differently(_pbmc_raw, baseline_runner):
    loaded = sck.AnnotationRunner.load(baseline_runner.runner_dir_)
    assert loaded.normalisation_ == baseline_runner.normalisation_
    assert baseline_runner.normalisation_["kind"] == "log1p"  # pbmc68k's .raw
    query = _pbmc_raw.copy()
    query.X = np.expm1(query.X.toarray() if hasattr(query.X, "toarray") else query.X) * 100
    with pytest.warns(UserWarning, match="normalise the query") as caught:
        sck.tl.annotate(query, loaded, chunk_size=200)
    assert sum("normalise the query" in str(w.message) for w in caught) == 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the same normalisation: no warning
        warnings.simplefilter("always")
        sck.tl.annotate(_pbmc_raw.copy(), loaded)
    assert not [w for w in caught if "normalise the query" in str(w.message)]


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("p_thres", "confidence_threshold="),
        ("mode", "confidence_threshold="),
        ("model", "runner="),
        ("use_GPU", "device="),
        ("transpose_input", r"adata\.T"),
    ],
)
def test_celltypist_argument_names_are_refused_naming_ours(annotated, baseline_runner, name, ours):
    from anndata.tests.helpers import assert_equal

    before = annotated.copy()
    with pytest.raises(TypeError, match=rf"no argument '{name}' \(CellTypist's name\).*{ours}"):
        sck.tl.annotate(annotated, baseline_runner, **{name: 0.5})
    assert_equal(annotated, before)
    with pytest.raises(TypeError, match="unexpected keyword argument 'p_threshold'"):
        sck.tl.annotate(annotated, baseline_runner, p_threshold=0.5)
