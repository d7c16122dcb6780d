"""Label transfer as CellTypist users expect it: thresholds and probabilities at annotate time,
majority voting, marker genes (coefficients and integrated gradients), and their plots."""

from __future__ import annotations

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

import scdlkit as sck
from scdlkit.cli import build_parser, main
from scdlkit.tl._labelling import probability_columns
from scdlkit.tl._majority_voting import (
    HETEROGENEOUS,
    majority_vote,
    over_cluster,
    over_clustering_resolution,
)

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def baseline_runner(_pbmc_raw, checkpoint_dir, tmp_path_factory):
    """A saved ``baseline`` runner fitted on pbmc68k_reduced's ``.raw`` (``bulk_labels``)."""
    runner = sck.AnnotationRunner(
        label_key="bulk_labels",
        strategies=("baseline",),
        checkpoint=checkpoint_dir,
        random_state=0,
        **FAST,
    ).fit(_pbmc_raw)
    runner.save(tmp_path_factory.mktemp("baseline") / "runner")
    return runner


@pytest.fixture(scope="module")
def annotated(_pbmc_raw, baseline_runner):
    adata = _pbmc_raw.copy()
    sck.tl.annotate(adata, baseline_runner)
    return adata


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


# ------------------------------------------------------------------------- majority voting


def test_majority_vote_gives_each_cluster_its_most_frequent_label():
    labels = np.array(["a", "a", "b", "b", "b", "c", "a", "b"], dtype=object)
    clusters = np.array(["0", "0", "0", "1", "1", "1", "2", "2"], dtype=object)
    voted, summary = majority_vote(labels, clusters)
    assert list(voted) == ["a", "a", "a", "b", "b", "b", "a", "a"]  # tie in "2": sorted first
    assert summary.set_index("cluster")["share"].round(3).to_dict() == {
        "0": 0.667,
        "1": 0.667,
        "2": 0.5,
    }
    voted, _ = majority_vote(labels, clusters, min_prop=0.6)
    assert list(voted[-2:]) == [HETEROGENEOUS] * 2
    assert list(voted[:6]) == ["a", "a", "a", "b", "b", "b"]


def test_over_clustering_resolution_grows_with_cells_as_celltypist():
    sizes = [100, 5_000, 20_000, 40_000, 100_000, 200_000]
    assert [over_clustering_resolution(n) for n in sizes] == [5, 10, 15, 20, 25, 30]


def test_majority_voting_on_computed_over_clusters(annotated, baseline_runner, tmp_path):
    adata = annotated.copy()
    sck.tl.annotate(adata, baseline_runner, majority_voting=True, min_prop=0.5)
    clusters = adata.obs[f"{KEY}_over_clustering"]
    voted = adata.obs[f"{KEY}_majority_voting"]
    assert clusters.notna().all()
    assert voted.notna().all()
    n_clusters = clusters.nunique()
    assert 10 <= n_clusters < adata.n_obs // 4  # over-clustering: more clusters than labels
    per_cluster = voted.astype(str).groupby(clusters.to_numpy(), observed=True).nunique()
    assert (per_cluster == 1).all()  # every over-cluster gets one label
    summary = adata.uns[KEY]["majority_voting"]["clusters"]
    assert len(summary) == n_clusters
    assert ((summary["label"] == HETEROGENEOUS) == (summary["share"] < 0.5)).all()
    for _, row in summary.iterrows():  # the voted label is the cluster's most frequent one
        if row["label"] != HETEROGENEOUS:
            cells = (clusters == row["cluster"]).to_numpy()
            assert adata.obs[KEY][cells].value_counts().index[0] == row["label"]
    # voting agrees with most single-cell labels on this well-separated data
    assert (voted.astype(str) == adata.obs[KEY].astype(str)).mean() > 0.6
    assert adata.uns[KEY]["params"]["majority_voting"] is True
    adata.write_h5ad(tmp_path / "v.h5ad")
    back = ad.read_h5ad(tmp_path / "v.h5ad")
    assert (back.obs[f"{KEY}_majority_voting"] == voted).all()
    # annotating again without voting removes the stale vote
    sck.tl.annotate(adata, baseline_runner)
    assert f"{KEY}_majority_voting" not in adata.obs
    assert f"{KEY}_over_clustering" not in adata.obs


def test_majority_voting_on_a_given_obs_column(annotated, baseline_runner):
    adata = annotated.copy()
    sck.tl.annotate(adata, baseline_runner, majority_voting=True, over_clustering="louvain")
    assert f"{KEY}_over_clustering" not in adata.obs
    voted = adata.obs[f"{KEY}_majority_voting"].astype(str)
    assert (voted.groupby(adata.obs["louvain"].to_numpy(), observed=True).nunique() == 1).all()
    assert adata.uns[KEY]["majority_voting"]["method"] == "given"


def test_over_cluster_is_deterministic():
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    first, info = over_cluster(rep, random_state=3)
    second, _ = over_cluster(rep, random_state=3)
    assert (first == second).all()
    assert info["n_clusters"] == len(set(first)) > 1


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
