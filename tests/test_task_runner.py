"""TaskRunner (MLP / autoencoder / VAE baselines) and sck.tl.train_baseline on pbmc68k_reduced."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from anndata.tests.helpers import assert_equal
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

import scdlkit as sck
from scdlkit._shared.persist import LOCK_NAME
from scdlkit.baselines import (
    TaskRunner,
    knn_label_consistency,
    log_normalised_matrix,
    silhouette,
    stratified_split,
)
from scdlkit.tl._train_baseline import train_baseline

LABEL = "bulk_labels"
QUIET = {"progress": False, "device": "cpu"}
#: Enough to exercise every code path, not to learn anything.
TINY = {"epochs": 2, "hidden_dims": (16,), "latent_dim": 4, **QUIET}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models: two torch threads on shared, busy cores run about ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlp(_pbmc_raw):
    """The MLP classifier with its default settings (deterministic seed)."""
    adata = _pbmc_raw.copy()
    return adata, TaskRunner(model="mlp", label_key=LABEL, **QUIET).fit(adata)


@pytest.fixture(scope="module")
def vae(_pbmc_raw):
    adata = _pbmc_raw.copy()
    return adata, TaskRunner(model="vae", label_key=LABEL, **QUIET).fit(adata)


# ----------------------------------------------------------------------------- quality


def test_mlp_macro_f1_close_to_logistic_regression(mlp, capsys):
    adata, runner = mlp
    split = runner.split_labels_
    train, test = split == "train", split == "test"
    codes = adata.obs[LABEL].cat.codes.to_numpy()
    assert list(adata.obs[LABEL].cat.categories) == runner.label_categories_
    # the same features on the same split: standardised log-expression, train statistics
    x = log_normalised_matrix(adata).toarray()
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    z = np.clip((x - mean) / np.where(std > 1e-6, std, 1.0), -10, 10)
    logreg = LogisticRegression(max_iter=2000).fit(z[train], codes[train])
    lr_f1 = f1_score(codes[test], logreg.predict(z[test]), average="macro")
    mlp_f1 = runner.evaluate()["macro_f1"]
    with capsys.disabled():
        print(f"\nmacro-F1 on the test split: MLP {mlp_f1:.4f}, logistic regression {lr_f1:.4f}")
    assert mlp_f1 >= lr_f1 - 0.05
    metrics = runner.evaluate()
    assert set(metrics) == {
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "weighted_f1",
        "auroc_ovr",
        "n_cells",
    }
    assert metrics["n_cells"] == test.sum()
    assert metrics["auroc_ovr"] > 0.9


def test_vae_latent_beats_random_dimensions(vae, capsys):
    adata, runner = vae
    test = runner.split_labels_ == "test"
    codes = adata.obs[LABEL].cat.codes.to_numpy()[test]
    latent = runner.encode(adata)[test]
    random = np.random.default_rng(0).normal(size=(test.sum(), 10))
    vae_knn = knn_label_consistency(latent, codes, k=15)
    random_knn = knn_label_consistency(random, codes, k=15)
    with capsys.disabled():
        print(
            f"\nkNN label consistency (k=15, test): VAE {vae_knn:.4f}, random 10-d {random_knn:.4f}"
        )
    assert vae_knn > random_knn
    metrics = runner.evaluate()
    assert metrics["knn_label_consistency"] == pytest.approx(vae_knn)
    assert metrics["silhouette"] > silhouette(random, codes)
    assert 0 < metrics["reconstruction_loss"] < 1.5  # standardised features: 1 = predicting 0
    assert runner.latent_dim == latent.shape[1]


# ------------------------------------------------------------------------- persistence


def test_save_load_reproduces_predictions_exactly(mlp, vae, tmp_path):
    for name, (adata, runner) in {"mlp": mlp, "vae": vae}.items():
        folder = runner.save(tmp_path / name)
        manifest = json.loads((folder / "manifest.json").read_text(), parse_constant=_no_nan)
        assert manifest["schema_version"] == 1
        assert manifest["genes"] == list(adata.var_names)
        assert manifest["label_categories"] == runner.label_categories_
        assert len(list(folder.glob("weights-*.safetensors"))) == 1
        loaded = TaskRunner.load(folder, device="cpu")
        before, after = runner.predict(adata), loaded.predict(adata)
        assert before.keys() == after.keys()
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        assert loaded.evaluate() == runner.evaluate()
        pd.testing.assert_frame_equal(loaded.history_, runner.history_)
    np.testing.assert_array_equal(
        mlp[1].predict(mlp[0])["latent"], mlp[1].reference_predictions()["latent"]
    )


def _no_nan(token: str) -> None:
    msg = f"manifest holds {token}; it must be strict JSON"
    raise AssertionError(msg)


def test_save_is_atomic_and_load_refuses_tampering(mlp, tmp_path):
    _, runner = mlp
    folder = runner.save(tmp_path / "r")
    runner.save(folder)  # saving again over the same folder keeps one consistent pair
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)  # the lock stays
    assert names[0] == "manifest.json"
    assert len(names) == 2
    weights = next(folder.glob("weights-*.safetensors"))
    manifest_text = (folder / "manifest.json").read_text()

    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        TaskRunner.load(folder)

    runner.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for field, value, match in [
        ("schema_version", 99, "schema_version"),
        ("kind", "scdlkit.ScGPTAnnotationRunner", r"not '?(a )?scdlkit\.TaskRunner"),
        ("task", "representation", "valid combinations"),
        ("weights_file", "../weights.safetensors", "file name inside"),
        ("genes", "CD3E", "'genes'"),
    ]:
        broken = {**manifest, field: value}
        (folder / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            TaskRunner.load(folder)
    (folder / "manifest.json").write_text(manifest_text.replace('"latent_dim": 32', '"x": 1'))
    with pytest.raises(ValueError, match="model_config does not match"):
        TaskRunner.load(folder)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        TaskRunner.load(tmp_path / "nowhere")


#: Runs in a fresh interpreter where `import safetensors` fails (the `foundation` extra absent).
_WITHOUT_SAFETENSORS = """
import sys
sys.modules["safetensors"] = None  # any `import safetensors...` now raises ImportError
import anndata as ad
import numpy as np
import pytest
import scdlkit as sck

rng = np.random.default_rng(0)
adata = ad.AnnData(rng.poisson(2.0, size=(90, 30)).astype(np.float32))
adata.var_names = [f"G{i}" for i in range(30)]
adata.obs["cell_type"] = np.repeat(["a", "b", "c"], 30)
runner = sck.TaskRunner(
    model="mlp", label_key="cell_type", epochs=2, hidden_dims=(8,), latent_dim=4,
    precision="fp32", device="cpu", progress=False,
).fit(adata)
before = runner.predict(adata)
folder = runner.save(sys.argv[1])
weights = sorted(p.name for p in folder.glob("weights-*"))
assert len(weights) == 1 and weights[0].endswith(".pt"), weights
loaded = sck.TaskRunner.load(folder, device="cpu")
after = loaded.predict(adata)
for key in before:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
assert loaded.params() == runner.params()
with pytest.raises(ImportError, match="install safetensors"):
    sck.TaskRunner.load(sys.argv[2])
assert sys.modules["safetensors"] is None
print("ok", weights[0])
"""


def test_task_runner_works_without_safetensors(mlp, tmp_path):
    saved_with_safetensors = mlp[1].save(tmp_path / "st")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, "-c", _WITHOUT_SAFETENSORS]
    result = subprocess.run(
        [*script, str(tmp_path / "pt"), str(saved_with_safetensors)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("ok weights-")
    # The torch-format folder loads here too (safetensors installed) and refuses tampering.
    folder = tmp_path / "pt"
    assert TaskRunner.load(folder, device="cpu").label_categories_ == ["a", "b", "c"]
    weights = next(folder.glob("weights-*.pt"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        TaskRunner.load(folder)


def test_predict_aligns_genes_by_name(mlp, caplog):
    adata, runner = mlp
    expected = runner.predict(adata)
    shuffled = adata[:, adata.var_names[::-1]].copy()
    got = runner.predict(shuffled)
    np.testing.assert_array_equal(got["probabilities"], expected["probabilities"])
    partial = adata[:50, adata.var_names[10:]].copy()
    with caplog.at_level(logging.WARNING, logger="scdlkit"):
        out = runner.predict(partial)
    assert "10 of 765 model genes are missing" in caplog.text
    assert out["probabilities"].shape == (50, len(runner.label_categories_))
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)
    unrelated = ad.AnnData(np.ones((3, 2), np.float32))
    unrelated.var_names = ["NOT_A_GENE", "NOR_THIS"]
    with pytest.raises(ValueError, match="none of the 765 genes"):
        runner.predict(unrelated)


# ------------------------------------------------------------------------------ tl


def test_train_baseline_slots_survive_h5ad(pbmc_raw, tmp_path):
    labels = pbmc_raw.obs[LABEL].astype(object)
    labels.iloc[:5] = np.nan  # unlabelled cells are not trained on but still predicted
    pbmc_raw.obs[LABEL] = labels
    assert train_baseline(pbmc_raw, label_key=LABEL, **TINY) is None
    rep = train_baseline(
        pbmc_raw,
        model="autoencoder",
        label_key=LABEL,
        key_added="ae",
        copy=True,
        output_dir=tmp_path / "ae",
        **TINY,
    )
    assert "ae" not in pbmc_raw.uns  # copy=True leaves the input alone
    assert "ae" not in rep.obs  # representation writes no labels
    for adata, key in ((pbmc_raw, "baseline"), (rep, "ae")):
        first = adata.obs[f"{key}_split"].iloc[:5]
        # classification leaves unlabelled cells out; representation trains on every cell
        assert (first == "unlabelled").all() if key == "baseline" else (first != "unlabelled").all()
        assert adata.obsm[f"X_{key}"].shape == (adata.n_obs, 4)
        assert adata.obsm[f"X_{key}"].dtype == np.float32
        uns = adata.uns[key]
        assert {"params", "metrics", "label_categories", "versions", "history"} <= set(uns)
        assert list(uns["label_categories"]) == sorted(labels.dropna().unique())
        path = tmp_path / f"{key}.h5ad"
        adata.write_h5ad(path)
        back = ad.read_h5ad(path)
        assert_equal(back.uns[key], adata.uns[key])
        assert_equal(back.obs, adata.obs)
        assert_equal(back.obsm, adata.obsm)
    predicted = pbmc_raw.obs["baseline"]
    assert isinstance(predicted.dtype, pd.CategoricalDtype)
    assert predicted.notna().all()
    assert set(pbmc_raw.obs["baseline_split"].cat.categories) == {
        "train",
        "val",
        "test",
        "unlabelled",
    }
    assert pbmc_raw.uns["baseline"]["params"]["label_key"] == LABEL
    assert pbmc_raw.uns["baseline"]["params"]["layer"] == "None"
    assert pbmc_raw.uns["baseline"]["task"] == "classification"
    assert rep.uns["ae"]["runner_dir"] == str(tmp_path / "ae")
    assert set(rep.uns["ae"]["metrics"]["test"]) == {
        "knn_label_consistency",
        "silhouette",
        "reconstruction_loss",
        "n_cells",
    }
    loaded = sck.TaskRunner.load(tmp_path / "ae", device="cpu")
    np.testing.assert_array_equal(loaded.encode(rep), rep.obsm["X_ae"])


def test_same_seed_same_result_and_no_labels_needed_for_representation(pbmc_raw):
    a = TaskRunner(model="vae", **TINY).fit(pbmc_raw)
    b = TaskRunner(model="vae", **TINY).fit(pbmc_raw)
    np.testing.assert_array_equal(a.encode(pbmc_raw), b.encode(pbmc_raw))
    metrics = a.evaluate()
    assert metrics["knn_label_consistency"] is None  # no label_key: label metrics undefined
    assert metrics["silhouette"] is None
    assert np.isfinite(metrics["reconstruction_loss"])
    assert a.label_categories_ == []
    assert (a.split_labels_ != "unlabelled").all()  # every cell is trained or held out


# ---------------------------------------------------------------------------- errors


def _scaled_with_raw(pbmc_raw):
    adata = pbmc_raw.copy()
    adata.raw = pbmc_raw
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    adata.X = (x - x.mean(axis=0)) / (x.std(axis=0) + 1)
    return adata


def _non_finite(pbmc_raw):
    adata = pbmc_raw.copy()
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    x[0, 0] = np.nan
    adata.X = x
    return adata


def _one_class(pbmc_raw):
    adata = pbmc_raw.copy()
    adata.obs["one"] = "T cell"
    return adata


def _duplicate_genes(pbmc_raw):
    adata = pbmc_raw.copy()
    names = adata.var_names.tolist()
    names[1] = names[0]
    adata.var_names = names
    return adata


ERRORS = [
    ("negative", _scaled_with_raw, {"label_key": LABEL}, ValueError, r"adata\.raw\.to_adata"),
    ("non_finite", _non_finite, {"label_key": LABEL}, ValueError, "NaN or infinite"),
    ("missing_label", None, {"label_key": "cell_type"}, KeyError, "not a column"),
    ("one_class", _one_class, {"label_key": "one"}, ValueError, "at least 2"),
    ("no_label_key", None, {}, ValueError, "needs label_key"),
    ("mlp_repr", None, {"task": "representation"}, ValueError, "valid combinations"),
    ("vae_cls", None, {"model": "vae", "task": "classification"}, ValueError, "'mlp'"),
    ("bad_model", None, {"model": "transformer"}, ValueError, "'autoencoder'"),
    ("bad_layer", None, {"label_key": LABEL, "layer": "counts"}, KeyError, "layers"),
    ("dup_genes", _duplicate_genes, {"label_key": LABEL}, ValueError, "var_names_make_unique"),
    ("clobber", None, {"label_key": LABEL, "key_added": LABEL}, ValueError, "overwrite"),
    (
        "fractions",
        None,
        {"label_key": LABEL, "val_size": 0.5, "test_size": 0.5},
        ValueError,
        "no cells",
    ),
    ("epochs", None, {"label_key": LABEL, "epochs": 0}, ValueError, "epochs"),
]


@pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning")
@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_errors_leave_adata_unchanged(pbmc_raw, make, kwargs, error, match):
    adata = make(pbmc_raw) if make is not None else pbmc_raw
    before = adata.copy()
    with pytest.raises(error, match=match):
        train_baseline(adata, **{**TINY, **kwargs})
    assert_equal(adata, before)


def test_runner_needs_fit_first():
    runner = TaskRunner(model="autoencoder")
    assert runner.task == "representation"
    for call in (runner.evaluate, lambda: runner.predict(None), runner.reference_predictions):
        with pytest.raises(RuntimeError, match="fit"):
            call()


# --------------------------------------------------------------------------- helpers


def test_stratified_split_is_deterministic_and_keeps_small_classes_in_train():
    strata = np.array([0] * 20 + [1] * 10 + [2] * 2)
    cells = np.arange(100, 132)
    a, small = stratified_split(cells, strata, val_size=0.2, test_size=0.1, random_state=3)
    b, _ = stratified_split(cells, strata, val_size=0.2, test_size=0.1, random_state=3)
    assert small == [2]
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a[name], b[name])
    assert np.sort(np.concatenate(list(a.values()))).tolist() == cells.tolist()
    assert {130, 131} <= set(a["train"])
    assert [len(a[n]) for n in ("train", "val", "test")] == [2 + 14 + 7, 4 + 2, 2 + 1]


def test_representation_metrics():
    x = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5, 5], [5.1, 5], [5.2, 5]])
    y = np.array([0, 0, 0, 1, 1, -1])
    assert knn_label_consistency(x, y, k=1) == 1.0
    assert knn_label_consistency(x, y, k=2) == pytest.approx(0.8)  # class 1 has 2 cells
    assert knn_label_consistency(x, y, k=50) == pytest.approx(0.4)  # all 4 others
    assert knn_label_consistency(x[:1], y[:1]) is None
    assert silhouette(x, y) > 0.9
    assert silhouette(x, np.zeros(6, dtype=int)) is None
    with pytest.raises(ValueError, match="integer"):
        knn_label_consistency(x, y.astype(float))
