"""Marker genes of the predicted labels: they point up (higher in the label's cells, as
CellTypist's only_positive), integrated gradients explain a contrast between classes, the
runner is the recorded one, and the dot plot of them."""

from __future__ import annotations

import json

import anndata as ad
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import scdlkit as sck

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}


def _png_ok(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.shape[0] > 100
    assert image[..., :3].std() > 0.05  # something was drawn


def _mean_log_expression(adata, cells) -> pd.Series:
    """Mean of the (log-normalised) values of these cells, per gene."""
    matrix = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
    return pd.Series(matrix[cells].mean(axis=0), index=adata.var_names)


def _assert_markers_point_up(adata, markers) -> None:
    """Every marker is higher in its label's cells than in the other cells, as reported."""
    assert len(markers) > 0
    labels = adata.obs[KEY].astype(str).to_numpy()
    for label, group in markers.groupby("label"):
        inside = _mean_log_expression(adata, labels == label)
        outside = _mean_log_expression(adata, labels != label)
        genes = group["gene"].to_numpy()
        difference = (inside - outside)[genes].to_numpy()
        assert (difference > 0).all(), (label, genes[difference <= 0])
        np.testing.assert_allclose(
            group["expression_difference"].to_numpy(), difference, rtol=1e-4, atol=1e-6
        )
        assert (group["score"] > 0).all()


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
    assert list(markers.columns) == ["label", "rank", "gene", "score", "expression_difference"]
    for label, known in MARKERS.items():
        top = markers[markers["label"] == label].sort_values("rank")
        assert list(top["rank"]) == list(range(1, 11))
        assert (np.diff(top["score"].to_numpy()) <= 0).all()
        assert set(top["gene"]) & known, (label, list(top["gene"]))
    params = baseline_markers.uns[f"{KEY}_markers_params"]
    assert params["method"] == "linear_attribution"
    assert params["direction"].startswith("up")


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


def test_integrated_gradients_add_up_to_the_contrast_difference(fixture_runners):
    """Completeness: a cell's attributions sum to contrast(input) - contrast(zero baseline)."""
    from scdlkit.foundation._attribution import integrated_gradients
    from scdlkit.foundation.models.scgpt._genes import tokenize_adata
    from scdlkit.foundation.models.scgpt._tokenize import collate_tokens

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
            logits = head(encoder.transformer_encoder(x, mask, first_only=True)[:, 0])
            # the contrast: the class's logit minus the mean of the other classes' logits
            others = (logits.sum(1) - logits[rows, target]) / (logits.shape[1] - 1)
            return logits[rows, target] - others

        gap = logit(emb) - logit(emb * ~genes[..., None])
    error = np.abs(attr.sum(1).numpy() - gap.numpy())
    coarse = integrated_gradients(encoder, head, batch, target, n_steps=2).sum(1).numpy()
    # the midpoint rule converges: a few percent of the logit gaps at 128 points (ReLU kinks)
    assert error.max() < 0.05 * max(float(np.abs(gap.numpy()).max()), 1.0)
    assert error.max() < np.abs(coarse - gap.numpy()).max()


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


# ------------------------------------------------------------------- markers point up


def test_baseline_markers_are_higher_in_the_labels_cells(baseline_markers):
    _assert_markers_point_up(baseline_markers, baseline_markers.uns[f"{KEY}_markers"])


def test_a_gene_lower_in_the_label_with_a_negative_coefficient_is_no_marker():
    """Both factors of ``coef * (class mean - overall mean)`` negative: a positive score, but
    the gene is lower in the class's cells, so it is left out."""
    from scdlkit.foundation._attribution import expression_difference, top_genes

    # 6 cells, 2 classes; gene "down" is lower in class A, "up" higher, "flat" the same
    # log-normalised values (not integers: no counts to normalise)
    values = np.array(
        [[0.0, 3.5, 1.5], [0.0, 3.5, 1.5], [0.0, 3.5, 1.5], [2.5, 0.0, 1.5], [2.5, 0.0, 1.5],
         [2.5, 0.0, 1.5]],
        dtype=np.float32,
    )  # fmt: skip
    adata = ad.AnnData(values)
    adata.var_names = ["down", "up", "flat"]
    codes = np.array([0, 0, 0, 1, 1, 1])
    difference = expression_difference(adata, codes, 2, gene_key=None, layer=None)
    np.testing.assert_allclose(difference.to_numpy(), [[-2.5, 3.5, 0.0], [2.5, -3.5, 0.0]])
    coef = np.array([[-1.0, 0.5, 1.0], [1.0, -0.5, -1.0]])  # class A reads "down"'s absence
    class_minus_overall = np.array([[-1.0, 1.5, 0.0], [1.0, -1.5, 0.0]])
    scores = pd.DataFrame(coef * class_minus_overall, index=["A", "B"], columns=adata.var_names)
    assert scores.loc["A", "down"] > scores.loc["A", "up"] > 0  # "down" would rank first
    markers = top_genes(scores, 3, difference)
    assert list(markers.loc[markers["label"] == "A", "gene"]) == ["up"]
    assert list(markers.loc[markers["label"] == "B", "gene"]) == ["down"]
    assert "down" in list(top_genes(scores, 3).query("label == 'A'")["gene"])  # without: kept


def test_expression_difference_log_normalises_counts_and_reads_backed(tmp_path):
    from scdlkit.foundation._attribution import expression_difference

    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(40, 7)).astype(np.float32)
    codes = rng.integers(-1, 3, size=40)
    adata = ad.AnnData(sparse.csr_matrix(counts))
    logged = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    expected = np.stack([logged[codes == c].mean(0) - logged[codes != c].mean(0) for c in range(3)])
    got = expression_difference(adata, codes, 3, gene_key=None, layer=None)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-5)
    adata.write_h5ad(tmp_path / "c.h5ad")
    backed = ad.read_h5ad(tmp_path / "c.h5ad", backed="r")
    np.testing.assert_allclose(
        expression_difference(backed, codes, 3, gene_key=None, layer=None).to_numpy(),
        expected,
        rtol=1e-5,
    )
    backed.file.close()


@pytest.mark.parametrize("strategy", ["frozen_probe", "head", "lora"])
def test_scgpt_markers_are_higher_in_the_labels_cells(fixture_runners, strategy):
    adata, runners = fixture_runners
    adata = adata.copy()
    sck.tl.annotate(adata, runners[strategy])
    sck.tl.annotation_markers(adata, runner=runners[strategy], n_genes=10, n_steps=4)
    _assert_markers_point_up(adata, adata.uns[f"{KEY}_markers"])
    params = adata.uns[f"{KEY}_markers_params"]
    assert params["target"] == "logit minus mean of the other logits"


def test_contrast_is_the_logit_minus_the_mean_of_the_other_known_classes():
    from scdlkit.foundation._attribution import contrast

    logits = torch.tensor([[1.0, 2.0, 6.0, -1e4], [0.0, 3.0, 3.0, -1e4]])
    known = torch.tensor([True, True, True, False])  # a class the probe never saw
    got = contrast(logits, torch.tensor([2, 0]), known)
    torch.testing.assert_close(got, torch.tensor([6.0 - 1.5, 0.0 - 3.0]))
    shifted = contrast(logits + torch.tensor([[5.0], [-2.0]]) * known, torch.tensor([2, 0]), known)
    torch.testing.assert_close(shifted, got)  # what moves every class alike is not explained


# --------------------------------------------------------------- the recorded runner


def test_markers_refuse_a_runner_folder_changed_since_the_record(
    annotated, baseline_runner, tmp_path
):
    import shutil

    folder = tmp_path / "runner"
    shutil.copytree(baseline_runner.runner_dir_, folder)
    adata = annotated.copy()
    sck.tl.annotate(adata, str(folder))
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=1))  # same model
    before = dict(adata.uns)
    with pytest.raises(ValueError, match="changed since the record was written"):
        sck.tl.annotation_markers(adata)
    assert f"{KEY}_markers" not in adata.uns
    assert set(adata.uns) == set(before)
    sck.tl.annotation_markers(adata, runner=str(folder), n_genes=3)  # the folder itself: fine
    assert f"{KEY}_markers" in adata.uns


# ---------------------------------------------------------------------------------- CLI


def test_cli_markers_writes_the_table_and_the_anndata(annotated, tmp_path, capsys):
    from scdlkit.cli import main

    path = tmp_path / "query.h5ad"
    annotated.write_h5ad(path)
    out, csv = tmp_path / "out" / "markers.h5ad", tmp_path / "markers.csv"
    argv = ["markers", str(path), "-o", str(out), "--csv", str(csv), "--n-genes", "5"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "CD19+ B: CD79A" in printed
    result = ad.read_h5ad(out)
    markers = result.uns[f"{KEY}_markers"]
    assert (markers.groupby("label")["rank"].max() <= 5).all()
    table = pd.read_csv(csv)
    pd.testing.assert_frame_equal(
        table, markers.reset_index(drop=True), check_dtype=False, check_exact=False
    )
    expected = annotated.copy()
    sck.tl.annotation_markers(expected, n_genes=5)
    pd.testing.assert_frame_equal(
        markers.reset_index(drop=True),
        expected.uns[f"{KEY}_markers"].reset_index(drop=True),
        check_dtype=False,
    )
    # a runner folder that is not there: a one-line usage error before the input is read
    assert main([*argv, "--runner", str(tmp_path / "nope"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_markers_explains_every_option_with_its_default(capsys):
    import argparse

    from scdlkit.cli import build_parser, main

    assert main(["markers", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for option in action.choices["markers"]._actions:
        assert option.help, option.dest
        if option.option_strings:
            assert option.option_strings[-1] in text
        if option.default not in (None, False, argparse.SUPPRESS) and option.option_strings:
            assert "default" in option.help, option.dest
    main(["--help"])
    assert "markers" in capsys.readouterr().out
