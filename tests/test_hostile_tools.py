"""Issue 23, the tools: no half-written AnnData, re-voting keeps its input, keys that h5ad and
zarr keep, every argument checked before any work.

Every call that must fail runs inside :func:`unchanged`: the AnnData is compared with a copy
taken before the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from anndata.tests.helpers import assert_equal

import scdlkit as sck
from scdlkit.foundation import ScGPTAnnotationRunner
from scdlkit.tl._labelling import label_cells

KEY = "scgpt_annotation"
FAST = {"progress": False, "precision": "fp32"}


@contextmanager
def unchanged(adata: ad.AnnData):
    """Assert that the block leaves ``adata`` exactly as it was (obs, obsm, uns, X, ...)."""
    before = adata.copy()
    yield
    assert_equal(adata, before)


@pytest.fixture(scope="module")
def small_ref(_pbmc_raw):
    rng = np.random.default_rng(0)
    return _pbmc_raw[np.sort(rng.choice(_pbmc_raw.n_obs, 160, replace=False))].copy()


@pytest.fixture(scope="module")
def runner(small_ref, checkpoint_dir, tmp_path_factory):
    """A fitted ``baseline`` runner, saved."""
    fitted = ScGPTAnnotationRunner(
        label_key="bulk_labels", strategies=("baseline",), checkpoint=checkpoint_dir, **FAST
    ).fit(small_ref)
    fitted.save(tmp_path_factory.mktemp("hostile") / "runner")
    return fitted


@pytest.fixture(scope="module")
def memory_runner(small_ref, checkpoint_dir):
    """A fitted ``baseline`` runner that was never saved (``runner_dir_`` is None)."""
    fitted = ScGPTAnnotationRunner(
        label_key="bulk_labels", strategies=("baseline",), checkpoint=checkpoint_dir, **FAST
    ).fit(small_ref)
    assert fitted.runner_dir_ is None
    return fitted


@pytest.fixture(scope="module")
def annotated(small_ref, runner):
    """``small_ref`` annotated by the saved runner, with a computed majority vote."""
    adata = small_ref.copy()
    sck.tl.annotate(adata, runner, majority_voting=True)
    return adata


@pytest.fixture(scope="module")
def memory_annotated(small_ref, memory_runner):
    """``small_ref`` annotated by the runner that was never saved."""
    adata = small_ref.copy()
    sck.tl.annotate(adata, memory_runner, majority_voting=True)
    return adata


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any tool reaches its first piece of work (model, data or weights)."""
    import scdlkit.baselines
    import scdlkit.foundation
    import scdlkit.foundation._adapt
    import scdlkit.foundation._attribution
    import scdlkit.foundation._stream
    import scdlkit.foundation.models.scgpt._genes

    def refuse(*args, **kwargs):
        msg = "work started before the checks"
        raise AssertionError(msg)

    monkeypatch.setattr(ScGPTAnnotationRunner, "predict", refuse)
    monkeypatch.setattr(ScGPTAnnotationRunner, "load", classmethod(refuse))
    monkeypatch.setattr(scdlkit.foundation._adapt, "adapt_scgpt_annotation", refuse)
    monkeypatch.setattr(scdlkit.foundation._attribution, "class_gene_scores", refuse)
    monkeypatch.setattr(scdlkit.foundation.models.scgpt._genes, "match_genes", refuse)
    monkeypatch.setattr(scdlkit.foundation._stream, "encode_adata", refuse)
    monkeypatch.setattr(scdlkit.foundation, "load_scgpt_model", refuse)
    # what the tools call since the model registry: foundation's public functions
    for name in ("adapt_scgpt_annotation", "adapt_models", "class_gene_scores", "embed_cells"):
        monkeypatch.setattr(scdlkit.foundation, name, refuse)
    monkeypatch.setattr(scdlkit.foundation, "inspect_annotation_data", refuse)
    monkeypatch.setattr(scdlkit.baselines.TaskRunner, "fit", refuse)


# ------------------------------------------------------------ 4: half-written AnnData


def test_annotate_with_a_runner_never_saved_records_that_in_uns(memory_annotated, tmp_path):
    record = memory_annotated.uns[KEY]
    assert record["runner_dir"] == "None"
    assert record["runner_saved"] is False
    assert record["runner_manifest_sha256"] == ""
    assert memory_annotated.obs[KEY].notna().all()
    assert memory_annotated.obsm[f"X_{KEY}"].shape[0] == memory_annotated.n_obs
    memory_annotated.write_h5ad(tmp_path / "a.h5ad")
    memory_annotated.write_zarr(tmp_path / "a.zarr")
    for back in (ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_zarr(tmp_path / "a.zarr")):
        assert back.uns[KEY]["runner_dir"] == "None"
        assert not back.uns[KEY]["runner_saved"]
        assert (back.obs[KEY] == memory_annotated.obs[KEY]).all()


def test_a_saved_runner_is_recorded_as_saved(annotated, runner):
    record = annotated.uns[KEY]
    assert record["runner_saved"] is True
    assert Path(record["runner_dir"]) == Path(runner.runner_dir_).resolve()
    assert record["runner_manifest_sha256"] == runner.manifest_sha256_


def test_the_record_of_a_never_saved_runner_is_refused_saying_so(memory_annotated, no_work):
    query = memory_annotated.copy()
    with unchanged(query), pytest.raises(ValueError, match="never saved"):
        sck.tl.annotate(query, memory_annotated.uns[KEY])
    with unchanged(query), pytest.raises(KeyError, match="never saved"):
        sck.tl.annotation_markers(query)


def test_a_failure_while_building_the_slots_leaves_annotate_s_adata_unchanged(
    small_ref, runner, monkeypatch
):
    import scdlkit._shared.slots as slots

    def broken():
        msg = "versions unavailable"
        raise RuntimeError(msg)

    monkeypatch.setattr(slots, "package_versions", broken)  # read while building uns
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(RuntimeError, match="versions unavailable"):
        sck.tl.annotate(adata, runner, majority_voting=True)


def test_predictions_that_do_not_fit_the_adata_are_refused_before_any_slot(
    small_ref, runner, monkeypatch
):
    predict = ScGPTAnnotationRunner.predict

    def short_latent(self, *args, **kwargs):
        out = predict(self, *args, **kwargs)
        out["latent"] = out["latent"][:-1]
        return out

    monkeypatch.setattr(ScGPTAnnotationRunner, "predict", short_latent)
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"rows for|incorrect shape"):
        sck.tl.annotate(adata, runner)


def test_adapt_annotation_writes_nothing_when_its_results_do_not_fit(
    small_ref, checkpoint_dir, tmp_path, monkeypatch
):
    import scdlkit.foundation as adapt  # tl imports the public name

    reference_predictions = ScGPTAnnotationRunner.reference_predictions

    def short_latent(self):
        out = dict(reference_predictions(self))
        out["latent"] = out["latent"][:-1]
        return out

    monkeypatch.setattr(ScGPTAnnotationRunner, "reference_predictions", short_latent)
    monkeypatch.setattr(adapt, "default_runner_dir", lambda: tmp_path / "runner")
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"rows for|incorrect shape"):
        sck.tl.adapt_annotation(
            adata, "bulk_labels", checkpoint=checkpoint_dir, strategies=("baseline",), **FAST
        )


def test_train_baseline_writes_nothing_when_its_results_do_not_fit(small_ref, monkeypatch):
    from scdlkit.baselines import TaskRunner

    reference_predictions = TaskRunner.reference_predictions

    def short_latent(self):
        out = dict(reference_predictions(self))
        out["latent"] = out["latent"][:-1]
        return out

    monkeypatch.setattr(TaskRunner, "reference_predictions", short_latent)
    adata = small_ref.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"rows for|incorrect shape"):
        sck.tl.train_baseline(adata, model="mlp", label_key="bulk_labels", epochs=1, progress=False)


def test_annotation_markers_writes_nothing_when_the_ranking_fails(annotated, runner, monkeypatch):
    import scdlkit.foundation as attribution  # tl imports the public name

    def broken(*args, **kwargs):
        msg = "ranking failed"
        raise RuntimeError(msg)

    monkeypatch.setattr(attribution, "top_genes", broken)
    adata = annotated.copy()
    with unchanged(adata), pytest.raises(RuntimeError, match="ranking failed"):
        sck.tl.annotation_markers(adata, runner=runner, n_genes=3)


# --------------------------------------------------------------------------- re-voting


def test_revoting_on_the_first_vote_s_clusters_keeps_that_column(annotated, runner):
    adata = annotated.copy()
    clusters = f"{KEY}_over_clustering"
    first = adata.obs[clusters].copy()
    sck.tl.annotate(adata, runner, majority_voting=True, over_clustering=clusters, min_prop=0.9)
    assert clusters in adata.obs.columns
    assert (adata.obs[clusters] == first).all()
    assert list(adata.obs[clusters].cat.categories) == list(first.cat.categories)
    voted = adata.obs[f"{KEY}_majority_voting"].astype(str)
    assert (voted.groupby(first.to_numpy(), observed=True).nunique() == 1).all()
    record = adata.uns[KEY]["majority_voting"]
    assert record["method"] == "given"
    assert record["over_clustering"] == clusters
    # a later call without a vote removes the vote, and still not the user's input column
    sck.tl.annotate(adata, runner)
    assert f"{KEY}_majority_voting" not in adata.obs.columns


@pytest.mark.parametrize("column", [KEY, f"{KEY}_confidence", f"{KEY}_majority_voting"])
def test_over_clustering_naming_a_column_the_call_writes_is_refused(
    annotated, runner, column, no_work
):
    adata = annotated.copy()
    with unchanged(adata), pytest.raises(ValueError, match=f"obs\\['{column}'\\]"):
        sck.tl.annotate(adata, runner, majority_voting=True, over_clustering=column)


def test_a_user_column_under_the_vote_s_name_is_neither_replaced_nor_dropped(small_ref, runner):
    adata = small_ref.copy()
    adata.obs[f"{KEY}_majority_voting"] = "mine"
    with unchanged(adata), pytest.raises(ValueError, match="scdlkit did not write"):
        sck.tl.annotate(adata, runner, majority_voting=True)
    sck.tl.annotate(adata, runner)  # no vote: the column is the user's and stays
    assert (adata.obs[f"{KEY}_majority_voting"] == "mine").all()


# ---------------------------------------------------------------------- slot names


def _tools(checkpoint_dir, runner, annotated):
    """Each tool as ``call(adata, **kwargs)`` (``kwargs`` override its defaults here), and the
    AnnData it takes (``None``: the reference cells)."""

    def tool(function, *args, adata=None, **defaults):
        return (lambda a, **k: function(a, *args, **{**defaults, **k})), adata

    return {
        "embed": tool(sck.tl.embed, checkpoint=checkpoint_dir, **FAST),
        "inspect": tool(sck.tl.inspect, "bulk_labels", checkpoint=checkpoint_dir),
        "adapt_annotation": tool(
            sck.tl.adapt_annotation,
            "bulk_labels",
            checkpoint=checkpoint_dir,
            strategies=("baseline",),
        ),
        "annotate": tool(sck.tl.annotate, runner),
        "majority_voting": tool(sck.tl.annotate, runner, majority_voting=True),
        "annotation_markers": tool(sck.tl.annotation_markers, runner=runner, adata=annotated),
        "train_baseline": tool(sck.tl.train_baseline, model="mlp", label_key="bulk_labels"),
    }


@pytest.mark.parametrize("key", ["scgpt/ann", "scgpt\\ann", ".", "..", "a\x00b", "", 3])
@pytest.mark.parametrize(
    "tool",
    ["embed", "inspect", "adapt_annotation", "annotate", "annotation_markers", "train_baseline"],
)
def test_keys_that_h5ad_or_zarr_cannot_hold_are_refused_before_work(
    tool, key, small_ref, checkpoint_dir, runner, annotated, no_work
):
    call, adata = _tools(checkpoint_dir, runner, annotated)[tool]
    adata = (adata if adata is not None else small_ref).copy()
    name = "key" if tool == "annotation_markers" else "key_added"
    with unchanged(adata), pytest.raises((ValueError, TypeError), match=name):
        call(adata, **{name: key})


def test_a_key_with_other_characters_round_trips(small_ref, runner, tmp_path):
    adata = small_ref[:30].copy()
    key = "scgpt ann.v2:ä"
    sck.tl.annotate(adata, runner, key_added=key)
    adata.write_h5ad(tmp_path / "k.h5ad")
    adata.write_zarr(tmp_path / "k.zarr")
    for back in (ad.read_h5ad(tmp_path / "k.h5ad"), ad.read_zarr(tmp_path / "k.zarr")):
        assert (back.obs[key] == adata.obs[key]).all()
        assert back.uns[key]["best_strategy"] == "baseline"


# ----------------------------------------------- 5: every argument checked before work

BAD_ARGUMENTS = [
    ("annotate", {"confidence_threshold": "0.5"}, TypeError, "confidence_threshold"),
    ("annotate", {"confidence_threshold": 1.5}, ValueError, "confidence_threshold"),
    ("annotate", {"confidence_threshold": np.nan}, ValueError, "confidence_threshold"),
    ("annotate", {"min_prop": "0.1"}, TypeError, "min_prop"),
    ("annotate", {"min_prop": 2}, ValueError, "min_prop"),
    ("annotate", {"chunk_size": 0}, ValueError, "chunk_size"),
    ("annotate", {"chunk_size": 2.5}, TypeError, "chunk_size"),
    ("annotate", {"unknown_label": None}, TypeError, "unknown_label"),
    ("annotate", {"majority_voting": 1}, TypeError, "majority_voting"),
    ("annotate", {"probabilities": "yes"}, TypeError, "probabilities"),
    ("annotate", {"random_state": -1}, ValueError, "random_state"),
    ("annotate", {"random_state": 1.5}, TypeError, "random_state"),
    ("annotate", {"device": "gpu"}, ValueError, "device"),
    ("annotate", {"device": 0}, TypeError, "device"),
    ("annotate", {"gene_key": 5}, TypeError, "gene_key"),
    ("annotate", {"layer": ""}, ValueError, "layer"),
    ("annotate", {"checkpoint": 3}, TypeError, "checkpoint"),
    ("annotate", {"copy": "no"}, TypeError, "copy"),
    ("majority_voting", {"over_clustering": 5}, TypeError, "over_clustering"),
    ("majority_voting", {"over_clustering": {"a": 1}}, TypeError, "over_clustering"),
    ("majority_voting", {"min_prop": -0.1}, ValueError, "min_prop"),
    ("annotation_markers", {"n_genes": 2.5}, TypeError, "n_genes"),
    ("annotation_markers", {"n_genes": 0}, ValueError, "n_genes"),
    ("annotation_markers", {"n_steps": "4"}, TypeError, "n_steps"),
    ("annotation_markers", {"max_cells_per_label": 0}, ValueError, "max_cells_per_label"),
    ("annotation_markers", {"batch_size": 0}, ValueError, "batch_size"),
    ("annotation_markers", {"chunk_size": 1.5}, TypeError, "chunk_size"),
    ("annotation_markers", {"random_state": "0"}, TypeError, "random_state"),
    ("annotation_markers", {"copy": 1}, TypeError, "copy"),
    ("embed", {"batch_size": 0}, ValueError, "batch_size"),
    ("embed", {"batch_size": 8.0}, TypeError, "batch_size"),
    ("embed", {"chunk_size": -1}, ValueError, "chunk_size"),
    ("embed", {"precision": "fp16"}, ValueError, "precision"),
    ("embed", {"random_state": "1"}, TypeError, "random_state"),
    ("embed", {"device": "cuda:x"}, ValueError, "device"),
    ("embed", {"copy": None}, TypeError, "copy"),
    ("embed", {"checkpoint": None}, TypeError, "checkpoint"),
    ("inspect", {"batch_key": 3}, TypeError, "batch_key"),
    ("inspect", {"gene_key": ""}, ValueError, "gene_key"),
    ("inspect", {"copy": "no"}, TypeError, "copy"),
    ("adapt_annotation", {"batch_size": 2.5}, TypeError, "batch_size"),
    ("adapt_annotation", {"val_size": "0.1"}, TypeError, "val_size"),
    ("adapt_annotation", {"test_size": 1.0}, ValueError, "test_size"),
    ("adapt_annotation", {"n_repeats": 0}, ValueError, "n_repeats"),
    ("adapt_annotation", {"random_state": -1}, ValueError, "random_state"),
    ("adapt_annotation", {"output_dir": 5}, TypeError, "output_dir"),
    ("adapt_annotation", {"copy": 1}, TypeError, "copy"),
    ("adapt_annotation", {"confidence_threshold": "0.5"}, TypeError, "confidence_threshold"),
    ("adapt_annotation", {"epochs": 0}, ValueError, "epochs"),
    ("adapt_annotation", {"overwrite": "yes"}, TypeError, "overwrite"),
    ("train_baseline", {"label_key": 3}, TypeError, "label_key"),
    ("train_baseline", {"layer": 1}, TypeError, "layer"),
    ("train_baseline", {"copy": "no"}, TypeError, "copy"),
]


def test_bad_arguments_of_every_tool_are_refused_before_work(
    small_ref, checkpoint_dir, runner, annotated, no_work
):
    tools = _tools(checkpoint_dir, runner, annotated)
    failures = []
    for tool, kwargs, error, name in BAD_ARGUMENTS:
        call, adata = tools[tool]
        adata = (adata if adata is not None else small_ref).copy()
        try:
            with unchanged(adata), pytest.raises(error, match=name):
                call(adata, **kwargs)
        except (AssertionError, pytest.fail.Exception) as failure:  # name the case, go on
            failures.append(f"{tool}({kwargs}): {failure}")
    assert failures == []


def test_the_runner_argument_is_checked_before_work(annotated, no_work):
    adata = annotated.copy()
    for call in (sck.tl.annotate, lambda a, r: sck.tl.annotation_markers(a, runner=r)):
        with unchanged(adata), pytest.raises(TypeError, match="runner must be"):
            call(adata, 42)


def test_annotation_markers_on_an_unfitted_runner_says_to_fit_it_first(
    annotated, checkpoint_dir, no_work
):
    unfitted = ScGPTAnnotationRunner(
        label_key="bulk_labels", strategies=("baseline",), checkpoint=checkpoint_dir, **FAST
    )
    adata = annotated.copy()
    with unchanged(adata), pytest.raises(ValueError, match=r"not fitted.*fit"):
        sck.tl.annotation_markers(adata, runner=unfitted)
    with unchanged(adata), pytest.raises(ValueError, match=r"not fitted.*fit"):
        sck.tl.annotate(adata, unfitted)


@pytest.mark.parametrize(
    "tool", ["embed", "adapt_annotation", "annotate", "annotation_markers", "train_baseline"]
)
def test_an_adata_without_cells_is_refused_before_work(
    tool, small_ref, checkpoint_dir, runner, annotated, no_work
):
    call, adata = _tools(checkpoint_dir, runner, annotated)[tool]
    empty = (adata if adata is not None else small_ref)[:0].copy()
    with unchanged(empty), pytest.raises(ValueError, match="0 cells"):
        call(empty)


def test_numpy_numbers_are_accepted_where_python_ones_are(small_ref, runner, annotated):
    adata = small_ref[:60].copy()
    sck.tl.annotate(
        adata,
        runner,
        chunk_size=np.int64(25),
        confidence_threshold=np.float32(0.25),
        min_prop=np.float64(0.1),
        majority_voting=True,
        random_state=np.int32(0),
    )
    params = adata.uns[KEY]["params"]
    assert type(params["confidence_threshold"]) is float
    assert params["confidence_threshold"] == pytest.approx(0.25)
    assert type(params["min_prop"]) is float
    markers = annotated.copy()
    sck.tl.annotation_markers(markers, runner=runner, n_genes=np.int64(3), n_steps=np.int8(2))
    assert markers.uns[f"{KEY}_markers"].groupby("label")["rank"].max().max() == 3
    assert type(markers.uns[f"{KEY}_markers_params"]["n_genes"]) is int


def test_adapt_annotation_takes_numpy_integers(small_ref, checkpoint_dir, tmp_path):
    adata = small_ref.copy()
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=("baseline",),
        batch_size=np.int64(32),
        n_repeats=np.int64(1),
        random_state=np.int64(0),
        output_dir=tmp_path / "od",
        **FAST,
    )
    params = adata.uns[KEY]["params"]
    assert params["n_repeats"] == 1
    assert params["batch_size"] == 32
    adata.write_h5ad(tmp_path / "a.h5ad")


def test_cells_with_no_expression_get_the_unknown_label():
    probabilities = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]], dtype=np.float32)
    labels, categories = label_cells(
        probabilities, ["a", "b"], None, "?", no_expression=np.array([False, True, False])
    )
    assert list(labels) == ["a", "?", "b"]
    assert categories == ["a", "b", "?"]
    labels, categories = label_cells(probabilities, ["a", "b"], None, "?")
    assert categories == ["a", "b"]


# ------------------------------------------------------------------ the vote plot's hint


def test_a_missing_vote_slot_says_to_annotate_with_majority_voting(small_ref, runner):
    adata = small_ref[:40].copy()
    sck.tl.annotate(adata, runner)
    with unchanged(adata), pytest.raises(KeyError, match="majority_voting=True") as info:
        sck.pl.label_transfer(adata, "bulk_labels", majority_voting=True, show=False)
    assert "sck.tl.annotate" in str(info.value)
    assert "adapt_annotation" not in str(info.value)
