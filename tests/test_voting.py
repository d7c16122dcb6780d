"""Majority voting as CellTypist does it: clusters of the expression (not of the model), Leiden
or a visible k-means fallback, no vote on 50 cells or fewer, min_prop only with voting, and the
label-transfer plot coloured by the probability of the voted label."""

from __future__ import annotations

import contextlib
import warnings
from importlib.util import find_spec

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import scdlkit as sck
from scdlkit.pl._probabilities import annotation_probabilities
from scdlkit.tl import _majority_voting
from scdlkit.tl._majority_voting import (
    HETEROGENEOUS,
    MIN_CELLS_TO_VOTE,
    expression_representation,
    majority_vote,
    over_cluster,
    over_clustering_resolution,
)

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}
HAS_IGRAPH = find_spec("igraph") is not None


def _over_clustering_warning():
    """The k-means fallback warns exactly when igraph is missing."""
    if HAS_IGRAPH:
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match="igraph is not installed")


@pytest.fixture(scope="module")
def voted(_pbmc_raw, baseline_runner):
    adata = _pbmc_raw.copy()
    with _over_clustering_warning():
        sck.tl.annotate(adata, baseline_runner, majority_voting=True, min_prop=0.5)
    return adata


# ------------------------------------------------------------------------------ the vote


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


def test_majority_voting_on_computed_over_clusters(voted, baseline_runner, tmp_path):
    adata = voted.copy()
    clusters = adata.obs[f"{KEY}_over_clustering"]
    vote = adata.obs[f"{KEY}_majority_voting"]
    assert clusters.notna().all()
    assert vote.notna().all()
    n_clusters = clusters.nunique()
    assert 10 <= n_clusters < adata.n_obs // 4  # over-clustering: more clusters than labels
    per_cluster = vote.astype(str).groupby(clusters.to_numpy(), observed=True).nunique()
    assert (per_cluster == 1).all()  # every over-cluster gets one label
    record = adata.uns[KEY]["majority_voting"]
    summary = record["clusters"]
    assert len(summary) == n_clusters
    assert ((summary["label"] == HETEROGENEOUS) == (summary["share"] < 0.5)).all()
    for _, row in summary.iterrows():  # the voted label is the cluster's most frequent one
        if row["label"] != HETEROGENEOUS:
            cells = (clusters == row["cluster"]).to_numpy()
            assert adata.obs[KEY][cells].value_counts().index[0] == row["label"]
    # voting agrees with most single-cell labels on this well-separated data
    assert (vote.astype(str) == adata.obs[KEY].astype(str)).mean() > 0.6
    assert adata.uns[KEY]["params"]["majority_voting"] is True
    assert record["performed"] is True or record["performed"] == 1
    assert record["method"] == ("leiden" if HAS_IGRAPH else "kmeans")
    assert record["representation"].startswith("expression")
    adata.write_h5ad(tmp_path / "v.h5ad")
    back = ad.read_h5ad(tmp_path / "v.h5ad")
    assert (back.obs[f"{KEY}_majority_voting"] == vote).all()
    assert back.uns[KEY]["majority_voting"]["method"] == record["method"]
    # annotating again without voting removes the stale vote
    sck.tl.annotate(adata, baseline_runner)
    assert f"{KEY}_majority_voting" not in adata.obs
    assert f"{KEY}_over_clustering" not in adata.obs


def test_computed_clusters_come_from_the_expression_not_the_model(
    _pbmc_raw, voted, baseline_runner, monkeypatch
):
    clusters = voted.obs[f"{KEY}_over_clustering"].astype(str).to_numpy()
    # the same clusters as over-clustering the expression's principal components by hand ...
    with _over_clustering_warning():
        by_hand, _ = over_cluster(expression_representation(_pbmc_raw), random_state=0)
    assert (clusters == by_hand).all()
    # ... and the same whatever representation the model gives the cells
    predict = baseline_runner.predict

    def scrambled(*args, **kwargs):
        out = dict(predict(*args, **kwargs))
        out["latent"] = np.random.default_rng(1).normal(size=out["latent"].shape)
        return out

    monkeypatch.setattr(baseline_runner, "predict", scrambled)
    adata = _pbmc_raw.copy()
    with _over_clustering_warning():
        sck.tl.annotate(adata, baseline_runner, majority_voting=True)
    assert (adata.obs[f"{KEY}_over_clustering"].astype(str).to_numpy() == clusters).all()


def test_a_backed_query_gets_the_same_expression_clusters(
    _pbmc_raw, voted, baseline_runner, tmp_path
):
    path = tmp_path / "q.h5ad"
    _pbmc_raw.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with _over_clustering_warning():
        sck.tl.annotate(backed, baseline_runner, majority_voting=True, min_prop=0.5, chunk_size=128)
    for column in (f"{KEY}_over_clustering", f"{KEY}_majority_voting"):
        assert (backed.obs[column].astype(str) == voted.obs[column].astype(str)).all()
    backed.file.close()


def test_expression_representation_treats_counts_and_log_values_alike():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(120, 60))).astype(np.float32)
    adata = ad.AnnData(counts)
    logged = ad.AnnData(
        np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    )
    a, b = expression_representation(adata), expression_representation(logged)
    assert a.shape == b.shape == (120, 50)
    np.testing.assert_allclose(np.abs(a), np.abs(b), rtol=1e-3, atol=1e-3)  # PC signs may flip


def test_majority_voting_on_a_given_obs_column(_pbmc_raw, baseline_runner):
    adata = _pbmc_raw.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given clusters: no over-clustering, no warning
        sck.tl.annotate(adata, baseline_runner, majority_voting=True, over_clustering="louvain")
    assert f"{KEY}_over_clustering" not in adata.obs
    vote = adata.obs[f"{KEY}_majority_voting"].astype(str)
    assert (vote.groupby(adata.obs["louvain"].to_numpy(), observed=True).nunique() == 1).all()
    assert adata.uns[KEY]["majority_voting"]["method"] == "given"


# ------------------------------------------------------------------ Leiden or k-means


def test_over_cluster_is_deterministic():
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with _over_clustering_warning():
        first, info = over_cluster(rep, random_state=3)
    with _over_clustering_warning():
        second, _ = over_cluster(rep, random_state=3)
    assert (first == second).all()
    assert info["n_clusters"] == len(set(first)) > 1


def test_over_cluster_uses_leiden_with_igraph():
    pytest.importorskip("igraph")
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clusters, info = over_cluster(rep, random_state=0)
    assert info["method"] == "leiden"
    assert info["resolution"] == 5.0
    assert len(set(clusters)) == info["n_clusters"] > 1


def test_over_cluster_falls_back_to_kmeans_visibly_without_igraph(monkeypatch):
    monkeypatch.setattr(_majority_voting, "find_spec", lambda name: None)
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"k-means \(30 clusters\).*scdlkit\[leiden\]"):
        clusters, info = over_cluster(rep, random_state=0)
    assert info["method"] == "kmeans"
    assert info["n_clusters"] == len(set(clusters)) == 30  # 7 x resolution 5, <= 300 / 10
    with pytest.warns(UserWarning, match=r"k-means \(12 clusters\)"):
        _, info = over_cluster(rep[:120], random_state=0)  # at most one cluster per 10 cells
    assert info["n_clusters"] == 12


def test_annotate_records_the_fallback(_pbmc_raw, baseline_runner, monkeypatch):
    monkeypatch.setattr(_majority_voting, "find_spec", lambda name: None)
    adata = _pbmc_raw.copy()
    with pytest.warns(UserWarning, match="igraph is not installed"):
        sck.tl.annotate(adata, baseline_runner, majority_voting=True)
    assert adata.uns[KEY]["majority_voting"]["method"] == "kmeans"


# ------------------------------------------------------------------- few cells, min_prop


def test_no_vote_on_50_cells_or_fewer(_pbmc_raw, baseline_runner, voted):
    small = voted[:MIN_CELLS_TO_VOTE].copy()  # holds the stale vote of the whole query
    assert f"{KEY}_majority_voting" in small.obs
    with pytest.warns(UserWarning, match=r"50 cells are too few to over-cluster"):
        sck.tl.annotate(small, baseline_runner, majority_voting=True)
    assert f"{KEY}_majority_voting" not in small.obs  # the stale vote is removed
    assert f"{KEY}_over_clustering" not in small.obs
    record = small.uns[KEY]["majority_voting"]
    assert not record["performed"]
    assert "too few" in record["reason"]
    assert small.obs[KEY].notna().all()  # the per-cell labels are there
    with pytest.raises(KeyError, match="skipped the vote"):
        sck.pl.label_transfer(small, "louvain", majority_voting=True)
    # 51 cells are voted on
    bigger = _pbmc_raw[: MIN_CELLS_TO_VOTE + 1].copy()
    with _over_clustering_warning():
        sck.tl.annotate(bigger, baseline_runner, majority_voting=True)
    assert bigger.obs[f"{KEY}_majority_voting"].notna().all()
    # given clusters are voted on whatever the number of cells
    tiny = _pbmc_raw[:20].copy()
    sck.tl.annotate(tiny, baseline_runner, majority_voting=True, over_clustering="louvain")
    assert tiny.obs[f"{KEY}_majority_voting"].notna().all()


def test_min_prop_without_voting_is_an_error(_pbmc_raw, baseline_runner):
    adata = _pbmc_raw.copy()
    before = adata.copy()
    with pytest.raises(ValueError, match=r"min_prop=0.3 is used only with majority_voting=True"):
        sck.tl.annotate(adata, baseline_runner, min_prop=0.3)
    assert list(adata.obs.columns) == list(before.obs.columns)
    assert list(adata.obsm.keys()) == list(before.obsm.keys())
    assert list(adata.uns.keys()) == list(before.uns.keys())
    sck.tl.annotate(adata, baseline_runner, min_prop=0.0)  # the default stays fine


# ------------------------------------------------------------------------------- the plot


def test_plot_colours_the_voted_label_by_its_own_probability(voted):
    from scdlkit.pl._label_transfer import label_transfer_table

    adata = voted.copy()
    vote_key = f"{KEY}_majority_voting"
    share, probability = label_transfer_table(adata, "bulk_labels", predicted_key=vote_key)
    probs = annotation_probabilities(adata)
    vote = adata.obs[vote_key].astype(str)
    # a (group, voted label) pair with cells whose own label differs from the vote
    differs = (vote != adata.obs[KEY].astype(str)) & (vote != HETEROGENEOUS)
    assert differs.any()
    cell = np.flatnonzero(differs.to_numpy())[0]
    group, label = str(adata.obs["bulk_labels"].iloc[cell]), vote.iloc[cell]
    cells = ((adata.obs["bulk_labels"].astype(str) == group) & (vote == label)).to_numpy()
    expected = probs.loc[cells, label].mean()
    assert probability.loc[group, label] == pytest.approx(expected, rel=1e-5)
    confidence = adata.obs[f"{KEY}_confidence"].to_numpy()[cells].mean()
    assert expected < confidence  # not the cells' own top probability
    # the drawn colours are these means
    fig = sck.pl.label_transfer(adata, "bulk_labels", majority_voting=True, return_fig=True)
    i, j = np.nonzero(share.to_numpy() > 0)
    np.testing.assert_allclose(
        fig.axes[0].collections[0].get_array().filled(np.nan),
        probability.to_numpy()[i, j],
        rtol=1e-6,
    )
    assert fig.axes[1].get_ylabel() == "mean probability of the voted label"
    plt.close(fig)


def test_plot_of_the_vote_needs_the_probabilities(voted, baseline_runner):
    adata = voted.copy()
    sck.tl.annotate(
        adata,
        baseline_runner,
        majority_voting=True,
        over_clustering=f"{KEY}_over_clustering",
        probabilities=False,
    )
    with pytest.raises(KeyError, match="probabilities=True"):
        sck.pl.label_transfer(adata, "bulk_labels", majority_voting=True)
    fig = sck.pl.label_transfer(adata, "bulk_labels", return_fig=True)  # per cell: fine
    plt.close(fig)


def test_heterogeneous_clusters_have_no_probability(_pbmc_raw, baseline_runner):
    from scdlkit.pl._label_transfer import label_transfer_table

    adata = _pbmc_raw.copy()
    sck.tl.annotate(
        adata, baseline_runner, majority_voting=True, over_clustering="louvain", min_prop=0.9
    )
    vote_key = f"{KEY}_majority_voting"
    assert (adata.obs[vote_key] == HETEROGENEOUS).any()
    _, probability = label_transfer_table(adata, "bulk_labels", predicted_key=vote_key)
    assert probability[HETEROGENEOUS].isna().all()
    others = probability.drop(columns=HETEROGENEOUS).to_numpy()
    assert np.nanmin(others) > 0
    assert pd.notna(others).any()
