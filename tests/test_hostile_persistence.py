"""Issue 23: saved runners that cannot be made to lie, to hang, or to write where a file says.

Provenance: every base-checkpoint file that changes outputs is pinned, and a moved checkpoint is
reported with its recorded path. Files a manifest or a lock can reach: a manifest never chooses
where files are written, the lock is never followed or waited on, a save removes only what it
wrote, tensor shapes are checked before anything is built, and concurrent saves never show a
reader a manifest naming a missing file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from anndata.tests.helpers import assert_equal
from safetensors.torch import load_file, save_file

import scdlkit as sck
from scdlkit._shared import persist
from scdlkit._shared.persist import UnsafeFileError, save_weights_folder
from scdlkit.baselines import _task_runner_io
from scdlkit.foundation import ScGPTAnnotationRunner, _runner_io

FAST = {"epochs": 1, "attention_dropout": 0.0, "progress": False, "precision": "fp32"}


@pytest.fixture(scope="module")
def small_ref(_pbmc_raw):
    rng = np.random.default_rng(0)
    return _pbmc_raw[np.sort(rng.choice(_pbmc_raw.n_obs, 160, replace=False))].copy()


@pytest.fixture(scope="module")
def module_ckpt(checkpoint_dir, tmp_path_factory):
    """A copy of the fixture checkpoint that the module's runners record as their base."""
    dest = tmp_path_factory.mktemp("base") / "ckpt"
    shutil.copytree(checkpoint_dir, dest)
    return dest


@pytest.fixture(scope="module")
def saved_probe(small_ref, module_ckpt, tmp_path_factory):
    """A frozen_probe runner fitted on the module's checkpoint copy, and its folder."""
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=module_ckpt, strategies=("frozen_probe",), **FAST
    ).fit(small_ref)
    return runner, runner.save(tmp_path_factory.mktemp("probe") / "runner")


@pytest.fixture(scope="module")
def saved_baseline(small_ref, module_ckpt, tmp_path_factory):
    """A baseline-only runner (no scGPT work to load it) and its folder."""
    runner = ScGPTAnnotationRunner(
        label_key="bulk_labels", checkpoint=module_ckpt, strategies=("baseline",), **FAST
    ).fit(small_ref)
    return runner, runner.save(tmp_path_factory.mktemp("baseline") / "runner")


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _annotate_fails(query, folder, error, match, **kwargs):
    """``sck.tl.annotate`` raises ``error`` and leaves the query exactly as it was."""
    before = query.copy()
    with pytest.raises(error, match=match) as info:
        sck.tl.annotate(query, folder, device="cpu", **kwargs)
    assert_equal(query, before)
    return str(info.value)


# ------------------------------------------------------------------------ item 2: provenance


def _permute_vocab(folder: Path) -> None:
    """Swap the ids of 200 genes among themselves (a valid vocabulary, other tokens)."""
    vocab = json.loads((folder / "vocab.json").read_text())
    genes = [g for g in vocab if not g.startswith("<")][:200]
    ids = [vocab[g] for g in genes]
    for gene, new in zip(genes, ids[1:] + ids[:1], strict=True):
        vocab[gene] = new
    (folder / "vocab.json").write_text(json.dumps(vocab))


def _change_n_bins(folder: Path) -> None:
    args = json.loads((folder / "args.json").read_text())
    args["n_bins"] = 11
    (folder / "args.json").write_text(json.dumps(args))


def test_manifest_pins_every_base_file_that_changes_outputs(saved_probe):
    _, folder = saved_probe
    recorded = _manifest(folder)["checkpoint"]
    base = Path(recorded["path"])
    assert set(recorded["files"]) == {"args.json", "vocab.json", "best_model.pt"}
    for name, digest in recorded["files"].items():
        assert digest == hashlib.sha256((base / name).read_bytes()).hexdigest()
    assert recorded["files"]["best_model.pt"] == recorded["sha256"]


@pytest.mark.parametrize(
    ("name", "change"), [("vocab.json", _permute_vocab), ("args.json", _change_n_bins)]
)
def test_a_changed_vocab_or_args_is_refused_naming_the_file(
    saved_probe, small_ref, tmp_path, name, change
):
    _, folder = saved_probe
    base = _copy(Path(_manifest(folder)["checkpoint"]["path"]), tmp_path / "base")
    change(base)
    query = small_ref[:40].copy()
    message = _annotate_fails(query, folder, ValueError, "differs", checkpoint=base)
    assert str(base / name) in message
    assert "checkpoint=" in message
    assert "verify_checkpoint=False" in message
    # on purpose, it still loads (and then predicts other labels, which is why it is refused)
    ScGPTAnnotationRunner.load(folder, checkpoint=base, device="cpu", verify_checkpoint=False)


def test_the_recorded_base_folder_changed_in_place_is_refused(saved_probe, tmp_path):
    _, src = saved_probe
    folder = _copy(src, tmp_path / "r")
    base = _copy(Path(_manifest(folder)["checkpoint"]["path"]), tmp_path / "base")
    manifest = _manifest(folder)
    manifest["checkpoint"]["path"] = str(base)  # as if it had been trained on this copy
    _write_manifest(folder, manifest)
    ScGPTAnnotationRunner.load(folder, device="cpu")  # intact: loads
    _permute_vocab(base)
    with pytest.raises(ValueError, match=r"vocab\.json differs"):
        ScGPTAnnotationRunner.load(folder, device="cpu")


def test_a_moved_base_checkpoint_names_the_recorded_path_and_the_fix(
    saved_probe, small_ref, tmp_path, monkeypatch
):
    runner, src = saved_probe
    folder = _copy(src, tmp_path / "r")
    base = _copy(Path(_manifest(folder)["checkpoint"]["path"]), tmp_path / "base")
    manifest = _manifest(folder)
    manifest["checkpoint"]["path"] = str(base)
    manifest["checkpoint"]["name"] = "base"
    _write_manifest(folder, manifest)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    base.rename(moved)
    # a folder that merely shares the old folder's name must not be picked up
    monkeypatch.chdir(tmp_path / "elsewhere")
    _copy(moved, tmp_path / "elsewhere" / "base")
    _permute_vocab(tmp_path / "elsewhere" / "base")
    query = small_ref[:40].copy()
    message = _annotate_fails(query, folder, FileNotFoundError, "no longer exists")
    assert str(base) in message  # the recorded path
    assert f"AnnotationRunner.load({str(folder)!r}, checkpoint=" in message  # and the fix
    loaded = ScGPTAnnotationRunner.load(folder, checkpoint=moved, device="cpu")
    expected = runner.predict(small_ref[:40].copy())["probabilities"]
    np.testing.assert_array_equal(loaded.predict(small_ref[:40].copy())["probabilities"], expected)


def test_a_runner_saved_before_pins_loads_and_checks_what_it_pinned(saved_probe, tmp_path):
    import torch as _torch

    _, src = saved_probe
    folder = _copy(src, tmp_path / "r")
    manifest = _manifest(folder)
    del manifest["checkpoint"]["files"], manifest["tensors"], manifest["retained_weights"]
    _write_manifest(folder, manifest)
    base = _copy(Path(manifest["checkpoint"]["path"]), tmp_path / "base")
    _permute_vocab(base)  # not pinned by that runner: it loads as it always did
    ScGPTAnnotationRunner.load(folder, checkpoint=base, device="cpu")
    state = _torch.load(base / "best_model.pt", weights_only=True)
    state["value_encoder.linear1.bias"] += 0.1
    _torch.save(state, base / "best_model.pt")
    with pytest.raises(ValueError, match=r"best_model\.pt differs"):
        ScGPTAnnotationRunner.load(folder, checkpoint=base, device="cpu")


# ----------------------------------------------- item 3: a manifest never decides where to write


def test_a_loaded_runner_never_writes_where_its_manifest_says(saved_baseline, small_ref, tmp_path):
    _, src = saved_baseline
    folder = _copy(src, tmp_path / "r")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "report.md").write_text("my report")
    manifest = _manifest(folder)
    manifest["init_params"].update(output_dir=str(victim), overwrite=True)
    _write_manifest(folder, manifest)
    loaded = ScGPTAnnotationRunner.load(folder, device="cpu")
    assert loaded.output_dir is None
    assert loaded.overwrite is False
    loaded.fit(small_ref.copy())  # a refit writes nothing anywhere unasked
    assert sorted(p.name for p in victim.iterdir()) == ["report.md"]
    assert (victim / "report.md").read_text() == "my report"


# -------------------------------------------------------------------------- item 3: the lock


def test_a_lock_symlinked_to_a_file_outside_is_refused_and_the_file_untouched(
    saved_baseline, tmp_path
):
    runner, src = saved_baseline
    folder = _copy(src, tmp_path / "r")
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate me")
    (folder / ".scdlkit.lock").unlink()
    (folder / ".scdlkit.lock").symlink_to(precious)
    before = _manifest(folder)
    with pytest.raises(UnsafeFileError, match=r"\.scdlkit\.lock is a symbolic link"):
        runner.save(folder)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        ScGPTAnnotationRunner.load(folder, device="cpu")
    assert precious.read_text() == "do not truncate me"
    assert _manifest(folder) == before
    assert isinstance(UnsafeFileError("x"), PermissionError)  # the command line exits 2


def test_a_lock_hard_linked_to_another_file_is_never_written(saved_baseline, tmp_path):
    runner, src = saved_baseline
    folder = _copy(src, tmp_path / "r")
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate me")
    (folder / ".scdlkit.lock").unlink()
    os.link(precious, folder / ".scdlkit.lock")
    with pytest.raises(UnsafeFileError, match="hard links"):
        runner.save(folder)
    assert precious.read_text() == "do not truncate me"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_lock_that_is_a_named_pipe_is_refused_without_hanging(saved_baseline, tmp_path):
    runner, src = saved_baseline
    folder = _copy(src, tmp_path / "r")
    lock = folder / ".scdlkit.lock"
    lock.unlink()
    os.mkfifo(lock)
    outcome = {}

    def load():
        try:
            ScGPTAnnotationRunner.load(folder, device="cpu")
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=60)
    hung = thread.is_alive()
    if hung:  # release the blocked open() so the thread can end
        os.close(os.open(lock, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
    assert not hung, "AnnotationRunner.load waited on a named pipe"
    assert isinstance(outcome.get("error"), UnsafeFileError)
    assert "named pipe" in str(outcome["error"])
    with pytest.raises(UnsafeFileError, match="named pipe"):
        runner.save(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_manifest_that_is_a_named_pipe_is_refused_without_hanging(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")
    outcome = {}

    def read():
        try:
            _task_runner_io.read_runner_folder(folder)
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        os.close(os.open(folder / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("reading a runner folder waited on a named pipe")
    assert isinstance(outcome.get("error"), UnsafeFileError)


# ------------------------------------------------------- item 3: a save removes only its own


def test_a_save_never_removes_the_users_own_weights_files(saved_baseline, tmp_path):
    runner, src = saved_baseline
    folder = _copy(src, tmp_path / "r")
    mine = {
        "weights-final.pt": b"my final weights",
        "weights-v1.safetensors": b"my first weights",
        "weights-notes.txt": b"notes",
    }
    for name, content in mine.items():
        (folder / name).write_bytes(content)
    names = [_manifest(folder)["weights_file"]]
    classifier = runner._best.model.classifier_
    intercept = classifier.intercept_
    try:
        for shift in (1.0, 2.0, 3.0):  # three saves of three different models
            classifier.intercept_ = intercept + shift
            runner.save(folder)
            names.append(_manifest(folder)["weights_file"])
    finally:
        classifier.intercept_ = intercept
    for name, content in mine.items():
        assert (folder / name).read_bytes() == content
    ours = sorted(p.name for p in folder.glob("weights-*") if p.name not in mine)
    assert ours == sorted(names[-2:])  # the current weights and the previous ones
    assert _manifest(folder)["retained_weights"][0]["file"] == names[-2]


def test_a_manifest_listing_a_users_file_as_retained_cannot_get_it_removed(tmp_path):
    folder = tmp_path / "r"

    def save(payload):
        save_weights_folder(folder, lambda f: f.write_bytes(payload) and ".safetensors", _render)

    save(b"one")
    decoy = folder / "weights-0123456789abcdef.safetensors"  # a weights-like name, not our bytes
    decoy.write_bytes(b"the user's")
    other = folder / "keep.safetensors"
    other.write_bytes(b"the user's too")
    manifest = _manifest(folder)
    manifest["retained_weights"] = [
        {"file": decoy.name, "sha256": "0123456789abcdef" + "0" * 48},
        {"file": other.name, "sha256": hashlib.sha256(b"the user's too").hexdigest()},
        {"file": "../outside.safetensors", "sha256": "0" * 64},
    ]
    _write_manifest(folder, manifest)
    (tmp_path / "outside.safetensors").write_bytes(b"outside")
    for payload in (b"two", b"three", b"four"):
        save(payload)
    assert decoy.read_bytes() == b"the user's"
    assert other.read_bytes() == b"the user's too"
    assert (tmp_path / "outside.safetensors").read_bytes() == b"outside"


def test_weights_moved_in_by_a_killed_save_are_removed_by_the_next(tmp_path):
    folder = tmp_path / "r"
    save_weights_folder(folder, lambda f: f.write_bytes(b"one") and ".safetensors", _render)
    dead = _dead_pid()
    orphan_digest = hashlib.sha256(b"killed").hexdigest()
    orphan = folder / f"weights-{orphan_digest[:16]}.safetensors"
    orphan.write_bytes(b"killed")  # moved in; the manifest naming it was never written
    marker = folder / f"{persist.TMP_PREFIX}{persist._host_tag()}-{dead}-abcd-pending-{orphan.name}"
    marker.touch()
    user = folder / "weights-final.pt"
    user.write_bytes(b"mine")
    save_weights_folder(folder, lambda f: f.write_bytes(b"two") and ".safetensors", _render)
    assert not orphan.exists()
    assert not marker.exists()
    assert user.read_bytes() == b"mine"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _render(name: str, digest: str) -> str:
    return json.dumps({"weights_file": name, "weights_sha256": digest})


# ------------------------------------------- item 3: shapes are checked before anything is built


def _tamper(folder: Path, edit) -> None:
    """Rewrite the weights with ``edit`` and record their new sha256, as an editor would."""
    manifest = _manifest(folder)
    weights = folder / manifest["weights_file"]
    tensors = load_file(str(weights))
    edit(tensors)
    save_file(tensors, str(weights))
    manifest["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    _write_manifest(folder, manifest)


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        msg = "a model was built from unchecked tensors"
        raise AssertionError(msg)

    monkeypatch.setattr(_runner_io, "_rebuild", refuse)


def _wider(tensors):
    coef = tensors["probe.coef"]
    tensors["probe.coef"] = torch.cat([coef, coef[:, :1]], dim=1)


def _narrower_dtype(tensors):
    tensors["probe.scaler_mean"] = tensors["probe.scaler_mean"].to(torch.float16)


@pytest.mark.parametrize(
    ("edit", "tensor"), [(_wider, "probe.coef"), (_narrower_dtype, "probe.scaler_mean")]
)
def test_probe_weights_with_another_shape_or_dtype_are_refused_before_building(
    saved_probe, small_ref, tmp_path, nothing_built, edit, tensor
):
    _, src = saved_probe
    folder = _copy(src, tmp_path / "r")
    _tamper(folder, edit)
    query = small_ref[:40].copy()
    message = _annotate_fails(query, folder, ValueError, "tensor")
    assert repr(tensor) in message


def test_a_tampered_record_does_not_hide_a_wrong_probe_shape(saved_probe, tmp_path, nothing_built):
    _, src = saved_probe
    folder = _copy(src, tmp_path / "r")
    _tamper(folder, _wider)
    manifest = _manifest(folder)
    manifest["tensors"]["probe.coef"]["shape"][1] += 1  # the editor fixed the record too
    _write_manifest(folder, manifest)
    with pytest.raises(ValueError, match=r"tensor 'probe\.coef' has shape .* embsize") as info:
        ScGPTAnnotationRunner.load(folder, device="cpu")
    assert str(folder) in str(info.value)


def test_a_probe_loaded_on_purpose_against_another_width_is_refused_before_building(
    saved_probe, tmp_path, nothing_built
):
    _, folder = saved_probe
    base = _copy(Path(_manifest(folder)["checkpoint"]["path"]), tmp_path / "base")
    args = json.loads((base / "args.json").read_text())
    args["embsize"] *= 2
    (base / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"tensor 'probe\.coef' reads 32 features .* gives 64"):
        ScGPTAnnotationRunner.load(folder, checkpoint=base, device="cpu", verify_checkpoint=False)


def test_task_runner_tensors_are_checked_before_the_model_is_built(tmp_path, monkeypatch):
    tensors = {"model.layer.weight": torch.zeros(3, 4), "features.mean": torch.zeros(4)}
    _task_runner_io.write_runner_folder(tmp_path / "r", tensors, _task_manifest("a"))
    folder = tmp_path / "r"
    _tamper(folder, lambda t: t.update({"model.layer.weight": torch.zeros(3, 5)}))
    monkeypatch.setattr(_task_runner_io, "build_model", None)  # building would be a TypeError
    with pytest.raises(ValueError, match=r"tensor 'model\.layer\.weight' has shape \(3, 5\)"):
        sck.TaskRunner.load(folder, device="cpu")


# ---------------------------------------- item 3: concurrent saves never show a missing file


def _task_manifest(tag: str) -> dict:
    """A minimal valid TaskRunner manifest (what ``read_runner_folder`` checks)."""
    return {
        "schema_version": _task_runner_io.SCHEMA_VERSION,
        "kind": _task_runner_io.KIND,
        "model": "mlp",
        "task": "classification",
        "params": {},
        "model_config": {},
        "genes": ["A", "B"],
        "label_categories": ["x", "y"],
        "metrics": {},
        "by": tag,
    }


#: A saving process: TaskRunner-shaped manifests and safetensors weights written through the
#: one folder writer, without importing torch (so the processes start in a fraction of a second).
_RACER = textwrap.dedent(
    """
    import json, os, struct, sys, time
    from pathlib import Path

    from scdlkit._shared.persist import save_weights_folder

    folder, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    manifest = json.loads(sys.argv[4])
    size = 4096

    def write(file):  # a safetensors file holding one uint8 tensor "model.w" of random bytes
        entry = {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}
        header = json.dumps({"model.w": entry})
        header += " " * (-len(header) % 8)
        file.write_bytes(struct.pack("<Q", len(header)) + header.encode() + os.urandom(size))
        return ".safetensors"

    def render(name, digest):
        tensors = {"model.w": {"shape": [size], "dtype": "uint8"}}
        record = {**manifest, "tensors": tensors, "weights_file": name, "weights_sha256": digest}
        return json.dumps(record)

    done, end = 0, time.monotonic() + 120
    while done < n and time.monotonic() < end:
        try:
            last = json.loads((folder / "manifest.json").read_text())["by"]
        except (OSError, ValueError, KeyError):
            last = None
        if last == tag:  # alternate: wait for the other process's save
            time.sleep(0.001)
            continue
        save_weights_folder(folder, write, render)
        done += 1
    print(done)
    """
)


def test_two_processes_alternating_200_saves_never_show_a_manifest_naming_a_missing_file(
    tmp_path, monkeypatch
):
    """What guarantees it: each save flushes its weights under a content-addressed name before
    the manifest naming them is renamed into place, and removes weights only afterwards, only
    those neither the new nor the replaced manifest names (so the folder's manifest always names
    weights that are there); and a loader reads the manifest and the weights under the folder's
    shared lock, which no save holds at the same time. The reader here is slowed between the
    manifest and the weights, as a descheduled process is, to give the saves every chance."""
    folder = tmp_path / "runner"
    _task_runner_io.write_runner_folder(folder, {"model.w": torch.zeros(4)}, _task_manifest("0"))
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    real_read = _task_runner_io._read_manifest

    def slow_read(path):  # a reader descheduled between the manifest and the weights
        manifest = real_read(path)
        time.sleep(0.015)
        return manifest

    monkeypatch.setattr(_task_runner_io, "_read_manifest", slow_read)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(folder), tag, "100", json.dumps(_task_manifest(tag))],
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    loads = load_failures = snapshots = snapshot_missing = 0
    deadline = time.monotonic() + 240
    i = 0
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        i += 1
        if i % 6 == 0:  # as TaskRunner.load reads: the manifest, then the weights it names
            loads += 1
            try:
                _task_runner_io.read_runner_folder(folder)
            except (OSError, ValueError, RuntimeError):  # the weights vanished under the reader
                load_failures += 1
            continue
        # without the lock: was the file missing while this manifest was the folder's?
        fd = os.open(folder / "manifest.json", os.O_RDONLY)
        try:
            name = json.loads(os.read(fd, 1 << 20))["weights_file"]
            missing = not (folder / name).is_file()
            current = os.stat(folder / "manifest.json").st_ino == os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if current:
            snapshots += 1
            snapshot_missing += missing
        time.sleep(0.002)
    saves = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert saves == [100, 100]
    assert load_failures == 0, f"{load_failures} of {loads} loads found the weights missing"
    assert snapshot_missing == 0, (
        f"{snapshot_missing} of {snapshots} manifests named a missing file"
    )
    assert loads > 10
    assert snapshots > 10
    weights = sorted(p.name for p in folder.glob("weights-*"))
    final = _manifest(folder)
    assert weights == sorted([final["weights_file"], final["retained_weights"][0]["file"]])
    assert not [p for p in folder.iterdir() if p.name.startswith(persist.TMP_PREFIX)]
