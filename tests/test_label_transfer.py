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
import torch

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


def test_over_cluster_uses_leiden_with_igraph():
    pytest.importorskip("igraph")
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    clusters, info = over_cluster(rep, random_state=0)
    assert info["method"] == "leiden"
    assert info["resolution"] == 5.0
    assert len(set(clusters)) == info["n_clusters"] > 1


def test_over_cluster_falls_back_to_kmeans_without_igraph(monkeypatch):
    from scdlkit.tl import _majority_voting

    monkeypatch.setattr(_majority_voting, "find_spec", lambda name: None)
    rep = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    clusters, info = over_cluster(rep, random_state=0)
    assert info["method"] == "kmeans"
    assert info["n_clusters"] == len(set(clusters)) == 50  # 10 x resolution 5, <= 300 / 5


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


# ------------------------------------------------------------------------------- markers

MARKERS = {
    "CD19+ B": {"CD79A", "CD79B", "MS4A1"},
    "CD56+ NK": {"GNLY", "NKG7", "GZMB", "PRF1"},
    "CD14+ Monocyte": {"LYZ", "S100A8", "S100A9", "FCN1", "CST3"},
}


@pytest.fixture(scope="module")
def baseline_markers(annotated, baseline_runner):
    adata = annotated.copy()
    sck.tl.annotation_markers(adata, n_genes=10)  # the runner from uns[KEY]["runner_dir"]
    return adata


def test_baseline_markers_name_the_known_marker_genes(baseline_markers):
    markers = baseline_markers.uns[f"{KEY}_markers"]
    assert list(markers.columns) == ["label", "rank", "gene", "score"]
    for label, known in MARKERS.items():
        top = markers[markers["label"] == label].sort_values("rank")
        assert list(top["rank"]) == list(range(1, 11))
        assert (np.diff(top["score"].to_numpy()) <= 0).all()
        assert set(top["gene"]) & known, (label, list(top["gene"]))
    assert baseline_markers.uns[f"{KEY}_markers_params"]["method"] == "linear_attribution"


def test_markers_survive_h5ad(baseline_markers, tmp_path):
    baseline_markers.write_h5ad(tmp_path / "m.h5ad")
    back = ad.read_h5ad(tmp_path / "m.h5ad").uns[f"{KEY}_markers"]
    pd.testing.assert_frame_equal(
        back.reset_index(drop=True),
        baseline_markers.uns[f"{KEY}_markers"].reset_index(drop=True),
        check_dtype=False,
    )


def test_markers_need_labels_and_a_runner(_pbmc_raw, annotated):
    with pytest.raises(KeyError, match="annotate"):
        sck.tl.annotation_markers(_pbmc_raw.copy())
    adata = annotated.copy()
    del adata.uns[KEY]
    with pytest.raises(KeyError, match="runner="):
        sck.tl.annotation_markers(adata)


@pytest.fixture(scope="module")
def fixture_runners(checkpoint_dir, tmp_path_factory):
    """One runner per scGPT family on the 48-cell fixture: probe, frozen head, LoRA."""
    adata = ad.read_h5ad(checkpoint_dir.parent / "data.h5ad")
    runners = {}
    for strategy in ("frozen_probe", "head", "lora"):
        runners[strategy] = sck.AnnotationRunner(
            label_key="cell_type",
            strategies=(strategy,),
            checkpoint=checkpoint_dir,
            batch_size=16,
            epochs=1,
            attention_dropout=0.0,
            device="cpu",
            **FAST,
        ).fit(adata)
        runners[strategy].save(tmp_path_factory.mktemp(strategy) / "runner")
    return adata, runners


@pytest.mark.parametrize("strategy", ["frozen_probe", "head", "lora"])
def test_scgpt_attributions_are_finite_and_name_query_genes(fixture_runners, strategy):
    adata, runners = fixture_runners
    adata = adata.copy()
    runner = runners[strategy]
    sck.tl.annotate(adata, runner)
    sck.tl.annotation_markers(adata, runner=runner, n_genes=5, n_steps=4)
    markers = adata.uns[f"{KEY}_markers"]
    assert len(markers) > 0
    assert np.isfinite(markers["score"]).all()
    assert set(markers["label"]) <= set(adata.obs[KEY].astype(str))
    assert set(markers["gene"]) <= set(adata.var_names)
    for _, group in markers.groupby("label"):
        assert list(group["rank"]) == list(range(1, len(group) + 1))
        assert (np.diff(group["score"].to_numpy()) <= 0).all()
    assert adata.uns[f"{KEY}_markers_params"]["method"] == "integrated_gradients"


def test_attribution_does_not_depend_on_batch_or_chunk(fixture_runners):
    from scdlkit.foundation._attribution import class_gene_scores

    adata, runners = fixture_runners
    runner = runners["lora"]
    codes = runner.predict(adata)["label_codes"]
    one = class_gene_scores(runner, adata, codes, n_steps=3, batch_size=1)
    many = class_gene_scores(runner, adata, codes, n_steps=3, batch_size=32, chunk_size=10)
    pd.testing.assert_frame_equal(one, many, rtol=1e-4, atol=1e-6)
    assert np.isfinite(one.to_numpy()).all()
    predicted = np.bincount(codes, minlength=len(runner.label_categories_)) > 0
    assert ((one.abs().sum(axis=1) > 0).to_numpy() == predicted).all()  # unpredicted: zeros


def test_integrated_gradients_add_up_to_the_logit_difference(fixture_runners):
    """Completeness: a cell's attributions sum to logit(input) - logit(zero-token baseline)."""
    from scdlkit.foundation._attribution import integrated_gradients
    from scdlkit.foundation._genes import tokenize_adata
    from scdlkit.foundation._tokenize import collate_tokens

    adata, runners = fixture_runners
    runner = runners["lora"]
    model = runner._best.model.eval()
    encoder = model.encoder

    def head(cls):
        return model.cls_decoder(model.feature_norm(cls))

    tokens, _ = tokenize_adata(adata, runner.checkpoint_, seed=runner.random_state)
    batch = collate_tokens(tokens, np.arange(6))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    attr = integrated_gradients(encoder, head, batch, target, n_steps=128)
    assert attr.shape == batch["gene_ids"].shape
    assert (attr[batch["padding_mask"]] == 0).all()
    assert (attr[:, 0] == 0).all()
    with torch.no_grad():
        emb = encoder.encoder(batch["gene_ids"]) + encoder.value_encoder(batch["values"])
        genes = ~batch["padding_mask"]
        genes[:, 0] = False
        padded = batch["padding_mask"].any()
        mask = (~batch["padding_mask"])[:, None, None, :] if padded else None
        rows = torch.arange(6)

        def logit(x):
            return head(encoder.transformer_encoder(x, mask, first_only=True)[:, 0])[rows, target]

        gap = logit(emb) - logit(emb * ~genes[..., None])
    error = np.abs(attr.sum(1).numpy() - gap.numpy())
    coarse = integrated_gradients(encoder, head, batch, target, n_steps=2).sum(1).numpy()
    # the midpoint rule converges: a few percent of the logit gaps at 128 points (ReLU kinks)
    assert error.max() < 0.05 * max(float(np.abs(gap.numpy()).max()), 1.0)
    assert error.max() < np.abs(coarse - gap.numpy()).max()


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


def test_annotation_markers_dotplot_shows_the_marker_genes(baseline_markers, tmp_path):
    from scdlkit.pl._annotation_markers import marker_genes

    genes = marker_genes(baseline_markers, n_genes=3, available=baseline_markers.var_names)
    fig = sck.pl.annotation_markers(baseline_markers, n_genes=3, return_fig=True, show=False)
    texts = {t.get_text() for a in fig.axes for t in a.get_xticklabels()}
    flat = [g for gs in genes.values() for g in gs]
    assert set(flat) <= texts
    assert len(flat) == len(set(flat))  # each gene once
    assert set(genes["CD19+ B"]) & MARKERS["CD19+ B"]
    groups = {t.get_text() for a in fig.axes for t in a.get_yticklabels()}
    assert set(baseline_markers.obs[KEY].astype(str)) <= groups
    # one dot per (predicted label, gene)
    main_ax = max(
        fig.axes, key=lambda a: len(a.collections[0].get_offsets()) if a.collections else 0
    )
    n_groups = baseline_markers.obs[KEY].nunique()
    assert len(main_ax.collections[0].get_offsets()) == n_groups * len(flat)
    fig.savefig(tmp_path / "markers.png")
    _png_ok(tmp_path / "markers.png")
    plt.close(fig)
    with pytest.raises(KeyError, match="annotation_markers"):
        sck.pl.annotation_markers(baseline_markers, key="other", groupby=KEY)


def test_annotation_markers_dotplot_skips_labels_without_cells(baseline_markers):
    subset = baseline_markers[baseline_markers.obs[KEY] != "CD34+"].copy()
    subset.obs[KEY] = subset.obs[KEY].cat.set_categories(baseline_markers.obs[KEY].cat.categories)
    assert "CD34+" in subset.obs[KEY].cat.categories  # a class no cell was given
    fig = sck.pl.annotation_markers(subset, n_genes=2, return_fig=True, show=False)
    groups = {t.get_text() for a in fig.axes for t in a.get_yticklabels()}
    assert "CD34+" not in groups
    assert "CD19+ B" in groups
    plt.close(fig)


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
