"""Issue 16, finding 3: a runner's manifest is checked against one schema before anything loads.

Every malformed manifest is a ValueError naming the file, the field and the fix; none gives a
KeyError, TypeError, AttributeError or IndexError, and none loads and fails later at predict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scdlkit.foundation import ScGPTAnnotationRunner

FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def saved(_pbmc_raw, checkpoint_dir, tmp_path_factory):
    """One saved runner per family kind: frozen_probe (tensors), head (model_config), baseline."""
    rng = np.random.default_rng(0)
    ref = _pbmc_raw[np.sort(rng.choice(_pbmc_raw.n_obs, 160, replace=False))].copy()
    folders = {}
    for strategy in ("frozen_probe", "head", "baseline"):
        runner = ScGPTAnnotationRunner(
            label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=(strategy,), **FAST
        ).fit(ref)
        folders[strategy] = runner.save(tmp_path_factory.mktemp(strategy) / "runner")
    return folders


def _walk(manifest, path: str):
    """The container holding the last part of a dotted path (digits index lists)."""
    *parents, last = (int(p) if p.isdigit() else p for p in path.split("."))
    target = manifest
    for key in parents:
        target = target[key]
    return target, last


def _set(path: str, value):
    def edit(manifest):
        target, last = _walk(manifest, path)
        target[last] = value

    return edit


def _drop(path: str):
    def edit(manifest):
        target, last = _walk(manifest, path)
        del target[last]

    return edit


def _categories(change):
    def edit(manifest):
        manifest["label_categories"] = change(manifest["label_categories"])
        if manifest.get("model_config"):
            manifest["model_config"]["label_categories"] = manifest["label_categories"]

    return edit


# (case id, strategy saved, edit of the parsed manifest, field the error names)
CASES = [
    ("kind-task-runner", "frozen_probe", _set("kind", "scdlkit.TaskRunner"), "kind"),
    ("schema-version-string", "frozen_probe", _set("schema_version", "1"), "schema_version"),
    ("schema-version-bool", "frozen_probe", _set("schema_version", True), "schema_version"),
    ("no-checkpoint", "frozen_probe", _drop("checkpoint"), "checkpoint"),
    ("checkpoint-list", "frozen_probe", _set("checkpoint", []), "checkpoint"),
    ("checkpoint-path-int", "head", _set("checkpoint.path", 3), "checkpoint.path"),
    ("checkpoint-no-args", "head", _drop("checkpoint.args"), "checkpoint.args"),
    ("no-params", "frozen_probe", _drop("params"), "params"),
    ("no-label-categories", "frozen_probe", _drop("label_categories"), "label_categories"),
    ("categories-string", "frozen_probe", _set("label_categories", "abc"), "label_categories"),
    (
        "categories-one-short-probe",
        "frozen_probe",
        _categories(lambda c: c[:-1]),
        "label_categories",
    ),
    ("categories-one-short-head", "head", _categories(lambda c: c[:-1]), "num_classes"),
    (
        "categories-one-short-baseline",
        "baseline",
        _categories(lambda c: c[:-1]),
        "label_categories",
    ),
    (
        "categories-duplicated",
        "frozen_probe",
        _categories(lambda c: [c[0], *c[:-1]]),
        "label_categories",
    ),
    ("categories-not-strings", "frozen_probe", _categories(lambda c: [1, *c[1:]]), "strings"),
    ("categories-one", "frozen_probe", _set("label_categories", ["a"]), "label_categories"),
    ("best-unknown", "frozen_probe", _set("best_strategy", "magic"), "best_strategy"),
    ("best-probe-to-head", "frozen_probe", _set("best_strategy", "head"), "best_strategy"),
    (
        "best-probe-to-head-everywhere",
        "frozen_probe",
        lambda m: (
            m.update(best_strategy="head"),
            m["strategy_metrics"][0].update(strategy="head"),
        ),
        "model_config",
    ),
    ("best-probe-to-baseline", "frozen_probe", _set("best_strategy", "baseline"), "best_strategy"),
    ("best-head-to-lora", "head", _set("best_strategy", "lora"), "best_strategy"),
    ("best-head-to-probe", "head", _set("best_strategy", "frozen_probe"), "best_strategy"),
    (
        "best-head-to-lora-everywhere",
        "head",
        lambda m: (
            m.update(best_strategy="lora"),
            m["model_config"].update(tuning_strategy="lora"),
            m["strategy_metrics"][0].update(strategy="lora"),
        ),
        "best_strategy",
    ),
    ("num-classes-huge", "head", _set("model_config.num_classes", 10**12), "num_classes"),
    ("num-classes-string", "head", _set("model_config.num_classes", "5"), "num_classes"),
    ("model-config-missing", "head", _drop("model_config"), "model_config"),
    ("model-config-extra-key", "head", _set("model_config.hidden", 3), "model_config"),
    ("dropout-out-of-range", "head", _set("model_config.classifier_dropout", 2), "dropout"),
    ("metrics-not-list", "frozen_probe", _set("strategy_metrics", {}), "strategy_metrics"),
    ("metrics-empty", "frozen_probe", _set("strategy_metrics", []), "strategy_metrics"),
    ("metrics-no-strategy", "frozen_probe", _drop("strategy_metrics.0.strategy"), "metrics"),
    (
        "metrics-string-value",
        "frozen_probe",
        lambda m: m["strategy_metrics"][0].update(test_accuracy="high"),
        "strategy_metrics",
    ),
    ("weights-traversal", "frozen_probe", _set("weights_file", "../w.safetensors"), "weights"),
    ("weights-not-safetensors", "frozen_probe", _set("weights_file", "w.pt"), "weights_file"),
    ("weights-sha-short", "frozen_probe", _set("weights_sha256", "abc"), "weights_sha256"),
    ("history-list", "head", _set("history", [1]), "history"),
    ("history-rows", "head", _set("history", {"head": [1, 2]}), "history"),
    ("batch-metrics-rows", "frozen_probe", _set("batch_metrics", [1]), "batch_metrics"),
    ("matched-genes-twice", "frozen_probe", _set("matched_genes", ["A", "A"]), "matched_genes"),
    ("baseline-genes-missing", "baseline", _set("baseline_genes", None), "baseline_genes"),
    ("init-params-unknown", "frozen_probe", _set("init_params.colour", "red"), "init_params"),
    ("init-params-bad-value", "frozen_probe", _set("init_params.batch_size", "64"), "init_params"),
    ("init-params-no-label", "frozen_probe", _drop("init_params.label_key"), "init_params"),
    (
        "legacy-params-no-label",
        "frozen_probe",
        lambda m: (m.pop("init_params"), m["params"].pop("label_key", None)),
        "params",
    ),
]


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize(
    ("strategy", "edit", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_manifest_is_a_value_error_naming_file_field_and_fix(
    saved, tmp_path, strategy, edit, field
):
    folder = _copy(saved[strategy], tmp_path / "r")
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as info:  # noqa: PT011 (the message is checked below)
        ScGPTAnnotationRunner.load(folder, device="cpu")
    message = str(info.value)
    assert type(info.value) is ValueError
    assert str(folder) in message  # the file
    assert field in message  # the field
    assert any(fix in message for fix in ("save the runner again", "load it with", "Save it"))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"runner"'])
def test_manifest_that_is_not_a_json_object_is_refused(saved, tmp_path, text):
    folder = _copy(saved["frozen_probe"], tmp_path / "r")
    (folder / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=r"manifest\.json"):
        ScGPTAnnotationRunner.load(folder, device="cpu")


def test_every_saved_manifest_passes_the_schema(saved):
    for folder in saved.values():
        runner = ScGPTAnnotationRunner.load(folder, device="cpu")
        assert len(runner.manifest_sha256_) == 64


def test_task_runner_folder_is_refused_by_kind(saved, tmp_path):
    folder = _copy(saved["frozen_probe"], tmp_path / "r")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["kind"] = "scdlkit.TaskRunner"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"TaskRunner.*load it with its own class"):
        ScGPTAnnotationRunner.load(folder)


def test_cli_annotate_with_a_malformed_manifest_exits_2_with_one_line(
    saved, tmp_path, _pbmc_raw, capsys
):
    from scdlkit.cli import main

    folder = _copy(saved["frozen_probe"], tmp_path / "r")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["init_params"]["label_key"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _pbmc_raw[:20].copy().write_h5ad(tmp_path / "q.h5ad")
    argv = ["annotate", str(tmp_path / "q.h5ad"), "--runner", str(folder)]
    assert main([*argv, "-o", str(tmp_path / "out.h5ad"), "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "init_params" in lines[0]
    assert "manifest.json" in lines[0]
