"""Issue 16: provenance that cannot lie, safe concurrent saves, every check before the work.

Each test names the numbered finding of the issue it covers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import scdlkit as sck
from scdlkit._shared import persist
from scdlkit._shared.persist import (
    RUN_MARKER,
    FolderBusyError,
    RunExistsError,
    folder_lock,
    save_weights_folder,
)
from scdlkit.foundation import ScGPTAnnotationRunner

KEY = "scgpt_annotation"
FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def small_ref(_pbmc_raw):
    rng = np.random.default_rng(0)
    return _pbmc_raw[np.sort(rng.choice(_pbmc_raw.n_obs, 160, replace=False))].copy()


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the runner starts tokenising (the first piece of model work)."""
    import scdlkit.foundation._runner as runner_module

    def refuse(*args, **kwargs):
        msg = "model work started before the checks"
        raise AssertionError(msg)

    monkeypatch.setattr(runner_module, "prepare_preflighted", refuse)


def _adapt(adata, checkpoint_dir, output_dir, strategy="frozen_probe", **kwargs):
    sck.tl.adapt_annotation(
        adata,
        "bulk_labels",
        checkpoint=checkpoint_dir,
        strategies=(strategy,),
        output_dir=output_dir,
        **FAST,
        **kwargs,
    )
    return adata


def _sha(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


# ---------------------------------------------------------------- finding 1: provenance


def test_uns_records_absolute_runner_dir_and_manifest_sha256(
    small_ref, checkpoint_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    adata = _adapt(small_ref.copy(), checkpoint_dir, "od")  # relative on purpose
    record = adata.uns[KEY]
    runner_dir = Path(record["runner_dir"])
    assert runner_dir.is_absolute()
    assert runner_dir == (tmp_path / "od" / "runner").resolve()
    assert record["runner_manifest_sha256"] == _sha(runner_dir / "manifest.json")
    assert record["params"]["output_dir"] == str((tmp_path / "od").resolve())
    # the record works from another working directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    query = small_ref[:40].copy()
    sck.tl.annotate(query, record, device="cpu")
    assert query.uns[KEY]["runner_manifest_sha256"] == record["runner_manifest_sha256"]


def test_annotate_refuses_a_swapped_runner_folder_naming_both_hashes(
    small_ref, checkpoint_dir, tmp_path
):
    old = _adapt(small_ref.copy(), checkpoint_dir, tmp_path / "od")
    new = _adapt(small_ref.copy(), checkpoint_dir, tmp_path / "od", "baseline", overwrite=True)
    old_sha, new_sha = (
        old.uns[KEY]["runner_manifest_sha256"],
        new.uns[KEY]["runner_manifest_sha256"],
    )
    assert old_sha != new_sha
    old.write_h5ad(tmp_path / "old.h5ad")  # the record survives a round trip
    record = ad.read_h5ad(tmp_path / "old.h5ad").uns[KEY]
    query = small_ref[:30].copy()
    before = query.copy()
    with pytest.raises(ValueError, match="changed since") as info:
        sck.tl.annotate(query, record, device="cpu")
    assert old_sha in str(info.value)
    assert new_sha in str(info.value)
    assert KEY not in query.obs
    assert KEY not in query.uns
    np.testing.assert_array_equal(query.X.toarray(), before.X.toarray())
    sck.tl.annotate(query, new.uns[KEY], device="cpu")  # the current record is accepted
    assert query.uns[KEY]["best_strategy"] == "baseline"


def test_annotate_refuses_a_folder_edited_in_place(small_ref, checkpoint_dir, tmp_path):
    adata = _adapt(small_ref.copy(), checkpoint_dir, tmp_path / "od")
    manifest_file = Path(adata.uns[KEY]["runner_dir"]) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["strategy_metrics"][0]["validation_accuracy"] = 1.0  # any edit changes the hash
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=_sha(manifest_file)):
        sck.tl.annotate(small_ref[:10].copy(), adata.uns[KEY], device="cpu")


def test_annotate_refuses_a_mapping_that_is_not_a_record(small_ref):
    with pytest.raises(ValueError, match="runner_manifest_sha256"):
        sck.tl.annotate(small_ref[:10].copy(), {"runner_dir": "x"})


# --------------------------------------------------------------- finding 2: concurrency

_RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from scdlkit._shared.persist import FolderBusyError, save_weights_folder

    folder, seconds, tag = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    saves = busy = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        payload = os.urandom(4096)
        def write(file):
            file.write_bytes(payload)
            return ".safetensors"
        def render(name, digest):
            return json.dumps({"weights_file": name, "weights_sha256": digest, "by": tag})
        try:
            save_weights_folder(folder, write, render)
            saves += 1
        except FolderBusyError:
            busy += 1
    print(json.dumps({"saves": saves, "busy": busy}))
    """
)


def test_two_process_save_race_never_leaves_a_manifest_naming_a_missing_file(tmp_path):
    folder = tmp_path / "runner"
    save_weights_folder(folder, lambda f: f.write_bytes(b"0") and ".safetensors", _render)
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(folder), "3", tag],
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    polls = missing = 0
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        with folder_lock(folder, shared=True):  # as a loader reads
            name = json.loads((folder / "manifest.json").read_text())["weights_file"]
            polls += 1
            missing += not (folder / name).is_file()
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert missing == 0, f"{missing} of {polls} polls saw a manifest naming a missing file"
    assert polls > 0
    assert sum(r["saves"] for r in results) > 0
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(persist.TMP_PREFIX)]
    assert leftovers == []
    weights = sorted(p.name for p in folder.glob("weights-*"))
    assert 1 <= len(weights) <= 2  # the current weights and at most the previous ones


def _render(name: str, digest: str) -> str:
    return json.dumps({"weights_file": name, "weights_sha256": digest})


def test_a_save_keeps_the_weights_the_replaced_manifest_named(tmp_path):
    folder = tmp_path / "r"
    names = []
    for payload in (b"one", b"two", b"three"):
        save_weights_folder(
            folder, lambda f, p=payload: f.write_bytes(p) and ".safetensors", _render
        )
        names.append(json.loads((folder / "manifest.json").read_text())["weights_file"])
    present = {p.name for p in folder.glob("weights-*")}
    assert present == {names[1], names[2]}


def test_a_second_saver_gets_a_clear_error_and_the_folder_is_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(persist, "SAVE_WAIT_SECONDS", 0.2)  # how long a save waits for the lock
    folder = tmp_path / "r"
    save_weights_folder(folder, lambda f: f.write_bytes(b"x") and ".safetensors", _render)
    before = (folder / "manifest.json").read_text()
    with folder_lock(folder), pytest.raises(FolderBusyError, match=r"another process \(last"):
        save_weights_folder(folder, lambda f: f.write_bytes(b"y") and ".safetensors", _render)
    assert (folder / "manifest.json").read_text() == before


def test_a_second_run_into_a_busy_output_dir_fails_before_work(
    small_ref, checkpoint_dir, tmp_path, no_work
):
    out = tmp_path / "od"
    out.mkdir()
    with folder_lock(out), pytest.raises(FolderBusyError, match="output_dir"):
        _adapt(small_ref.copy(), checkpoint_dir, out)


def test_output_dir_holding_a_run_is_refused_unless_overwrite(
    small_ref, checkpoint_dir, tmp_path, monkeypatch
):
    out = tmp_path / "od"
    _adapt(small_ref.copy(), checkpoint_dir, out)
    import scdlkit.foundation._runner as runner_module

    real = runner_module.prepare_preflighted
    monkeypatch.setattr(runner_module, "prepare_preflighted", None)  # work would be a TypeError
    adata = small_ref.copy()
    with pytest.raises(RunExistsError, match=r"overwrite=True") as info:
        _adapt(adata, checkpoint_dir, out)
    assert isinstance(info.value, ValueError)  # the command line exits 2 on it
    assert KEY not in adata.obs
    monkeypatch.setattr(runner_module, "prepare_preflighted", real)
    new = _adapt(small_ref.copy(), checkpoint_dir, out, "baseline", overwrite=True)
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["runner_manifest_sha256"] == new.uns[KEY]["runner_manifest_sha256"]


def test_other_files_in_output_dir_are_not_a_run(small_ref, checkpoint_dir, tmp_path):
    out = tmp_path / "od"
    (out / "random_checkpoint").mkdir(parents=True)  # as the tutorial does
    (out / "notes.txt").write_text("mine")
    _adapt(small_ref.copy(), checkpoint_dir, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_artifacts_are_moved_in_together_with_a_completion_marker(
    small_ref, checkpoint_dir, tmp_path
):
    out = tmp_path / "od"
    _adapt(small_ref.copy(), checkpoint_dir, out)
    marker = json.loads((out / RUN_MARKER).read_text())
    assert {"strategy_metrics.csv", "predictions.csv", "report.md"} <= set(marker["files"])
    assert all((out / name).is_file() for name in marker["files"])
    assert not [p for p in out.iterdir() if p.name.startswith(persist.TMP_PREFIX)]


def test_a_run_killed_while_writing_artifacts_leaves_no_marker_and_no_partial_files(
    small_ref, checkpoint_dir, tmp_path, monkeypatch
):
    from scdlkit._shared import run_files

    out = tmp_path / "od"
    _adapt(small_ref.copy(), checkpoint_dir, out)
    old_report = (out / "report.md").read_text()

    def half_then_crash(runner, folder):
        (folder / "report.md").write_text("half")
        msg = "killed"
        raise OSError(msg)

    monkeypatch.setitem(
        run_files._WRITERS,
        "artifacts",
        run_files.RunWriter(write=half_then_crash, files=("report.md",)),
    )
    with pytest.raises(OSError, match="killed"):
        _adapt(small_ref.copy(), checkpoint_dir, out, overwrite=True)
    assert not (out / RUN_MARKER).exists()  # the folder no longer claims a complete run
    assert (out / "report.md").read_text() == old_report  # never the half-written one
    assert not [p for p in out.iterdir() if p.name.startswith(persist.TMP_PREFIX)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_saves_are_cleaned_on_the_next_save(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    dead, host = _dead_pid(), persist._host_tag()
    dead_file = folder / f"{persist.TMP_PREFIX}{host}-{dead}-abcd-weights"
    dead_dir = folder / f"{persist.TMP_PREFIX}{host}-{dead}-abcd-staging"
    legacy = folder / f".weights-{dead}.tmp"
    live = folder / f"{persist.TMP_PREFIX}{host}-{os.getpid()}-abcd-weights"
    other_host = folder / f"{persist.TMP_PREFIX}ffffffff-{dead}-abcd-weights"
    for file in (dead_file, legacy, live, other_host):
        file.write_bytes(b"partial")
    dead_dir.mkdir()
    (dead_dir / "report.md").write_text("partial")
    save_weights_folder(folder, lambda f: f.write_bytes(b"x") and ".safetensors", _render)
    for removed in (dead_file, dead_dir, legacy):
        assert not removed.exists()
    assert live.exists()  # a live save's
    assert other_host.exists()  # and another host's are kept


def test_task_runner_saves_through_the_locked_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(persist, "SAVE_WAIT_SECONDS", 0.2)
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 20)
    adata = ad.AnnData(
        X=rng.poisson(np.where(labels[:, None] == "a", 5.0, 1.0), (40, 12)).astype(np.float32),
        obs={"cell_type": labels},
    )
    adata.obs_names = [f"c{i}" for i in range(40)]
    runner = sck.TaskRunner(
        model="mlp",
        label_key="cell_type",
        epochs=1,
        hidden_dims=(8,),
        latent_dim=4,
        progress=False,
    ).fit(adata)
    folder = tmp_path / "task"
    runner.save(folder)
    with folder_lock(folder), pytest.raises(FolderBusyError):
        runner.save(folder)
    assert sck.TaskRunner.load(folder).label_categories_ == ["a", "b"]


def test_cli_atomic_writes_clean_leftovers_of_killed_commands(tmp_path):
    from scdlkit.cli._io import write_json_atomic

    dead = _dead_pid()
    leftover = tmp_path / f"{persist.TMP_PREFIX}{persist._host_tag()}-{dead}-abcd-out.json"
    leftover.write_text("{")
    write_json_atomic({"a": 1}, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {"a": 1}
    assert not leftover.exists()


# ---------------------------------------------------- finding 5: results over the user's data


@pytest.mark.parametrize(
    ("key_added", "rename_label"),
    [
        ("bulk_labels", None),  # key_added is the label column
        ("scgpt", "scgpt_split"),  # the label column is named like a result column
        ("scgpt", "scgpt_confidence"),
    ],
)
def test_key_added_over_the_label_column_is_refused_before_work(
    small_ref, checkpoint_dir, key_added, rename_label, no_work
):
    adata = small_ref.copy()
    label = "bulk_labels"
    if rename_label:
        adata.obs[rename_label] = adata.obs.pop(label)
        label = rename_label
    before = adata.obs.copy()
    with pytest.raises(ValueError, match="key_added"):
        sck.tl.adapt_annotation(
            adata, label, checkpoint=checkpoint_dir, key_added=key_added, **FAST
        )
    assert adata.obs.equals(before)


def test_key_added_over_the_batch_column_or_user_columns_is_refused(
    small_ref, checkpoint_dir, no_work
):
    adata = small_ref.copy()
    adata.obs["donor"] = "d1"
    with pytest.raises(ValueError, match="batches"):
        sck.tl.adapt_annotation(
            adata,
            "bulk_labels",
            checkpoint=checkpoint_dir,
            key_added="donor",
            batch_key="donor",
            **FAST,
        )
    adata.obs["mine_confidence"] = 0.5
    with pytest.raises(ValueError, match=r"obs\['mine_confidence'\].*scdlkit did not"):
        sck.tl.adapt_annotation(
            adata, "bulk_labels", checkpoint=checkpoint_dir, key_added="mine", **FAST
        )
    with pytest.raises(ValueError, match="scdlkit did not"):
        sck.tl.annotate(adata, "unused-path", key_added="mine")


def test_annotating_again_over_scdlkit_slots_is_allowed(small_ref, checkpoint_dir, tmp_path):
    adata = _adapt(small_ref.copy(), checkpoint_dir, tmp_path / "od")
    sck.tl.annotate(adata, adata.uns[KEY], device="cpu")  # same key: scdlkit's own slots
    assert adata.obs[f"{KEY}_split"].unique().tolist() == ["query"]


# ----------------------------------------------------------- finding 6: checks before work


@pytest.mark.parametrize("blocked", ["itself", "parent"])
def test_output_dir_at_or_under_a_file_fails_before_work(
    small_ref, checkpoint_dir, tmp_path, blocked, no_work
):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker if blocked == "itself" else blocker / "run"
    with pytest.raises(NotADirectoryError, match="output_dir"):
        _adapt(small_ref.copy(), checkpoint_dir, out)


def test_unwritable_output_dir_fails_before_work(
    small_ref, checkpoint_dir, tmp_path, monkeypatch, no_work
):
    real_write_bytes = Path.write_bytes

    def refuse_in_od(self, data):
        if self.parent.name == "od":
            raise PermissionError(13, "Permission denied")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse_in_od)  # also refused as root
    with pytest.raises(PermissionError, match="not writable"):
        _adapt(small_ref.copy(), checkpoint_dir, tmp_path / "od")


# --------------------------------------------------------- finding 7: duplicated gene names


def test_duplicate_var_names_are_refused_before_work(small_ref, checkpoint_dir, no_work):
    adata = small_ref.copy()
    names = adata.var_names.tolist()
    names[1] = names[0]
    adata.var_names = names
    with pytest.raises(ValueError, match="var_names_make_unique") as info:
        _adapt(adata, checkpoint_dir, None)
    assert repr(names[0]) in str(info.value)


def test_duplicate_gene_symbols_in_a_query_are_refused(small_ref, checkpoint_dir):
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=("frozen_probe",), **FAST
    ).fit(small_ref)
    query = small_ref[:20].copy()
    query.var["symbol"] = query.var_names.tolist()
    query.var.iloc[2, query.var.columns.get_loc("symbol")] = query.var_names[3]
    with pytest.raises(ValueError, match=r"adata.var\['symbol'\].*Aggregate"):
        runner.predict(query, gene_key="symbol")
    query.var["symbol"] = [*query.var_names[:-2], "nan", "nan"]  # unmapped placeholders are fine
    runner.predict(query, gene_key="symbol")
    baseline = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=checkpoint_dir, strategies=("baseline",), **FAST
    ).fit(small_ref)
    with pytest.raises(ValueError, match="'nan'"):  # it reads every gene: no placeholder twice
        baseline.predict(query, gene_key="symbol")


# ------------------------------------------------------------------ finding 8: command line


def test_cli_adapt_into_a_folder_holding_a_run_exits_2_with_one_line(
    small_ref, checkpoint_dir, tmp_path, capsys
):
    from scdlkit.cli import main

    small_ref.write_h5ad(tmp_path / "ref.h5ad")
    out = tmp_path / "od"
    _adapt(small_ref.copy(), checkpoint_dir, out)
    argv = [
        "adapt",
        str(tmp_path / "ref.h5ad"),
        "--label-key",
        "bulk_labels",
        "--checkpoint",
        str(checkpoint_dir),
        "--strategies",
        "frozen_probe",
        "--output",
        str(tmp_path / "out.h5ad"),
        "--output-dir",
        str(out),
        "--precision",
        "fp32",
    ]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "overwrite=True" in lines[0]


# ------------------------------------------------------------ finding 9: the seed example


def test_seed_foundation_example_runs_with_prepared_batch_size(small_ref, checkpoint_dir):
    from scdlkit.foundation import (
        load_scgpt_annotation_model,
        prepare_scgpt_data,
        split_scgpt_data,
    )

    prepared = prepare_scgpt_data(
        small_ref, checkpoint=checkpoint_dir, label_key="bulk_labels", batch_size=16
    )
    assert prepared.batch_size == 16
    splits = split_scgpt_data(prepared, val_size=0.15, test_size=0.15, random_state=0)
    model = load_scgpt_annotation_model(
        len(prepared.label_categories),
        prepared.label_categories,
        checkpoint=checkpoint_dir,
        tuning_strategy="head",
    )
    trainer = sck.Trainer(
        model, batch_size=prepared.batch_size, epochs=1, precision="fp32", progress=False
    )
    trainer.fit(splits.train, splits.val)
    out = trainer.predict(prepared.dataset())
    assert out["logits"].shape == (prepared.n_cells, len(prepared.label_categories))
    assert prepare_scgpt_data(small_ref, checkpoint=checkpoint_dir).batch_size == 64
