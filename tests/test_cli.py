"""The ``scdlkit`` command line: in-process ``main([...])`` calls plus one real subprocess."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from anndata.tests.helpers import assert_equal

from scdlkit import cli
from scdlkit._version import __version__
from scdlkit.cli import main

KEY = "scgpt_annotation"
COMMANDS = ("inspect", "embed", "adapt", "annotate", "markers")


@pytest.fixture(scope="module")
def files(_pbmc_raw, tmp_path_factory) -> dict[str, Path]:
    """ref.h5ad (labelled), query.h5ad (held-out cells, labels removed), scaled.h5ad."""
    import scanpy as sc

    folder = tmp_path_factory.mktemp("cli")
    is_query = np.random.default_rng(0).random(_pbmc_raw.n_obs) < 0.2
    ref = _pbmc_raw[~is_query].copy()
    query = _pbmc_raw[is_query].copy()
    del query.obs["bulk_labels"]
    paths = {name: folder / f"{name}.h5ad" for name in ("ref", "query", "scaled")}
    ref.write_h5ad(paths["ref"])
    query.write_h5ad(paths["query"])
    sc.datasets.pbmc68k_reduced().write_h5ad(paths["scaled"])  # X is scaled: negative values
    return paths


def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def round_trip(files, checkpoint_dir, tmp_path_factory) -> dict:
    """``scdlkit adapt`` on the reference, then ``scdlkit annotate`` on the query (once)."""
    folder = tmp_path_factory.mktemp("round_trip")
    ref_out = folder / "results" / "ref_annotated.h5ad"  # "results/" does not exist yet
    adapt = run(
        [
            "adapt", files["ref"], "--label-key", "bulk_labels", "-o", ref_out,
            "--checkpoint", checkpoint_dir, "--strategies", "frozen_probe", "baseline",
            "--epochs", "1", "--attention-dropout", "0", "--precision", "fp32",
        ]
    )  # fmt: skip
    assert adapt[0] == 0, adapt[2]
    runner_dir = ad.read_h5ad(ref_out).uns[KEY]["runner_dir"]
    query_out = folder / "query_annotated.h5ad"
    annotate = run(["annotate", files["query"], "--runner", runner_dir, "-o", query_out])
    assert annotate[0] == 0, annotate[2]
    return {
        "folder": folder,
        "ref_out": ref_out,
        "query_out": query_out,
        "adapt": adapt,
        "annotate": annotate,
    }


# ---------------------------------------------------------------------------- the parser


def test_help_in_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "scdlkit.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    assert "Exit codes" in result.stdout
    script = Path(sys.executable).with_name("scdlkit")  # the console script of pyproject
    if script.exists():
        result = subprocess.run(
            [script, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0
        assert __version__ in result.stdout


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_explained_with_its_default(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    sub = _subparsers(cli.build_parser())[command]
    for action in sub._actions:
        assert action.help, action.dest
        if action.option_strings:
            assert action.option_strings[-1] in text
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert "default" in action.help or f"(default: {action.default}" in text, action.dest
    assert "-q, --quiet" in text
    assert "-v, --verbose" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"scdlkit {__version__}"


def test_strategy_choices_match_the_library():
    from scdlkit.foundation import STRATEGIES

    assert tuple(cli.STRATEGIES) == tuple(STRATEGIES)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["adapt", "ref.h5ad", "-o", "out.h5ad"],  # --label-key missing
        ["adapt", "ref.h5ad", "--label-key", "x", "-o", "o.h5ad", "--strategies", "magic"],
        ["adapt", "ref.h5ad", "--label-key", "x", "-o", "o.h5ad", "--epochs", "0"],
        ["adapt", "ref.h5ad", "--label-key", "x", "-o", "o.h5ad", "--val-size", "1.5"],
        ["annotate", "query.h5ad", "-o", "out.h5ad"],  # --runner missing
        ["embed", "cells.h5ad"],  # -o missing
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------ errors, logging


def test_missing_input_exits_2_with_a_message(tmp_path, capsys):
    missing = tmp_path / "missing.h5ad"
    assert main(["inspect", str(missing), "--label-key", "bulk_labels"]) == 2
    err = capsys.readouterr().err
    assert f"scdlkit: error: input file {str(missing)!r} does not exist" in err
    assert "Traceback" not in err


def test_unreadable_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    assert main(["embed", str(bad), "-o", str(tmp_path / "out.h5ad")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "out.h5ad").exists()


def test_library_errors_exit_2_traceback_only_with_verbose(files, checkpoint_dir, capsys):
    argv = [
        "inspect",
        str(files["ref"]),
        "--label-key",
        "nope",
        "--checkpoint",
        str(checkpoint_dir),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("scdlkit: error: label_key='nope'")
    assert "Traceback" not in err
    assert main([*argv, "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "KeyError" in err


def test_unexpected_error_exits_1_with_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something broke")

    monkeypatch.setattr(cli._commands, "run_inspect", boom)
    assert main(["inspect", "whatever.h5ad"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "scdlkit: error: unexpected RuntimeError: something broke" in err


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["inspect", "in.h5ad"], logging.WARNING),
        (["-q", "inspect", "in.h5ad"], logging.ERROR),
        (["-v", "inspect", "in.h5ad"], logging.INFO),
        (["-vv", "inspect", "in.h5ad"], logging.DEBUG),
        (["inspect", "in.h5ad", "-v"], logging.INFO),  # after the sub-command works too
    ],
)
def test_quiet_and_verbose_set_the_scdlkit_logger(argv, level, monkeypatch):
    logger = logging.getLogger("scdlkit")
    seen = {}

    def record(args):
        seen["level"] = logger.level
        seen["handlers"] = len(logger.handlers)
        return 0

    monkeypatch.setattr(cli._commands, "run_inspect", record)
    before = (logger.level, list(logger.handlers))
    assert main(argv) == 0
    assert seen["level"] == level
    assert seen["handlers"] == len(before[1]) + 1
    assert (logger.level, list(logger.handlers)) == before  # restored afterwards


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.h5ad"
    target.write_text("old")

    def interrupted_write():
        with cli.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_write()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]
    with cli.atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_help_does_not_import_torch():
    script = (
        "import contextlib, io, sys\n"
        "from scdlkit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main([*c, '--help']) for c in ([], ['inspect'], ['embed'], ['adapt'], "
        "['annotate'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 0, 0, 0, 0] False"


# ------------------------------------------------- user errors: exit 2, one line, before work


def _one_line_error(err: str) -> str:
    """The single ``scdlkit: error:`` line of ``err``, which must hold nothing else."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scdlkit: error: "), err
    return lines[0]


@pytest.fixture
def input_never_read(monkeypatch):
    """Make reading the input a bug (exit 1), to show that the checks come before it."""

    def read_input(*args, **kwargs):
        msg = "the input was read before the options were checked"
        raise AssertionError(msg)

    monkeypatch.setattr(cli._commands, "read_input", read_input)


def _argv(command: str, tmp_path: Path, out: Path) -> list[str]:
    cells = str(tmp_path / "cells.h5ad")
    return {
        "embed": ["embed", cells, "-o", str(out)],
        "adapt": ["adapt", cells, "--label-key", "bulk_labels", "-o", str(out)],
        "annotate": ["annotate", cells, "--runner", str(tmp_path), "-o", str(out)],
    }[command]


@pytest.mark.parametrize("command", ["embed", "adapt", "annotate"])
@pytest.mark.parametrize("device", ["foo", "cuda:x", ""])
def test_unknown_device_exits_2_before_any_work(
    command, device, tmp_path, input_never_read, capsys
):
    out = tmp_path / "out.h5ad"
    assert main([*_argv(command, tmp_path, out), "--device", device]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--device {device!r} is not a device that torch knows" in line
    assert "'cpu', 'cuda', 'cuda:N' or 'mps'" in line  # the fix
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["embed", "adapt", "annotate"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_only_machine_exits_2_before_any_work(
    command, device, tmp_path, input_never_read, capsys
):
    out = tmp_path / "out.h5ad"
    assert main([*_argv(command, tmp_path, out), "--device", device]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--device {device!r}: no CUDA GPU is available here" in line
    assert "use --device cpu or auto" in line


@pytest.mark.parametrize("command", ["embed", "adapt", "annotate", "inspect"])
def test_output_under_a_file_exits_2_before_any_work(command, tmp_path, input_never_read, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    out = blocker / "sub" / "out.h5ad"
    if command == "inspect":
        argv = ["inspect", str(tmp_path / "cells.h5ad"), "--json", str(blocker / "r.json")]
        what = "--json"
    else:
        argv, what = _argv(command, tmp_path, out), "output"
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"scdlkit: error: {what} " in line
    assert f"{str(blocker)!r} is a file, not a folder; choose another path" in line
    assert blocker.read_text() == "a file where a folder should be"


def test_output_in_an_unwritable_folder_exits_2_before_any_work(
    tmp_path, input_never_read, monkeypatch, capsys
):
    import tempfile

    # Simulated (permission bits do not stop root, which may run the tests): creating any file
    # in `locked` fails as on a read-only folder.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == locked:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = locked / "out.h5ad"
    assert main(_argv("embed", tmp_path, out)) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"cannot write to the folder {str(locked)!r} of output {str(out)!r}" in line
    assert "Permission denied" in line
    assert "choose a writable place" in line
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("blocked", ["itself", "parent"])
def test_adapt_output_dir_under_or_at_a_file_exits_2_before_any_work(
    blocked, tmp_path, input_never_read, capsys
):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    output_dir = blocker if blocked == "itself" else blocker / "run"
    argv = [*_argv("adapt", tmp_path, tmp_path / "out.h5ad"), "--output-dir", str(output_dir)]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--output-dir {str(output_dir)!r}" in line
    assert "is a file" in line


@pytest.mark.parametrize("size", ["empty", "truncated"])
def test_truncated_checkpoint_exits_2_naming_the_file(
    size, files, checkpoint_copy, tmp_path, capsys
):
    weights = checkpoint_copy / "best_model.pt"
    data = weights.read_bytes()
    weights.write_bytes(b"" if size == "empty" else data[: len(data) // 2])
    out = tmp_path / "out.h5ad"
    argv = ["embed", str(files["query"]), "-o", str(out), "--checkpoint", str(checkpoint_copy)]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"{weights} is not a readable PyTorch weights file" in line
    assert "truncated or corrupted" in line
    assert "Download or copy the checkpoint again" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- commands


def test_inspect_ok_exits_0_and_writes_reports(files, checkpoint_dir, tmp_path, capsys):
    report_json = tmp_path / "report.json"
    out = tmp_path / "inspected.h5ad"
    argv = ["inspect", files["ref"], "--label-key", "bulk_labels", "--checkpoint", checkpoint_dir]
    code = main([str(a) for a in argv] + ["--json", str(report_json), "-o", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "scGPT preflight (ok)" in stdout
    assert "705 of 765" in stdout
    report = json.loads(report_json.read_text())
    assert report["ok"] is True
    assert report["n_genes_matched"] == 705
    assert ad.read_h5ad(out).uns["scgpt_inspect"]["n_genes_matched"] == 705


def test_inspect_scaled_data_exits_2(files, checkpoint_dir, tmp_path, capsys):
    report_json = tmp_path / "report.json"
    argv = [
        "inspect",
        files["scaled"],
        "--label-key",
        "bulk_labels",
        "--checkpoint",
        checkpoint_dir,
    ]
    assert main([str(a) for a in argv] + ["--json", str(report_json)]) == 2
    captured = capsys.readouterr()
    assert "PROBLEM: values are negative (scaled data)" in captured.out
    assert "1 blocking problem found" in captured.err
    report = json.loads(report_json.read_text())  # the report is written also on problems
    assert report["ok"] is False
    assert report["value_kind"] == "scaled_negative"


def test_embed_writes_obsm(files, checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "embedded.h5ad"
    argv = ["embed", files["query"], "-o", out, "--checkpoint", checkpoint_dir, "--batch-size", 32]
    assert main([str(a) for a in argv]) == 0
    assert "obsm['X_scgpt']" in capsys.readouterr().out
    embedded = ad.read_h5ad(out)
    emb = embedded.obsm["X_scgpt"]
    assert emb.shape == (embedded.n_obs, 32)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert embedded.uns["scgpt"]["params"]["batch_size"] == 32


def test_adapt_writes_the_annotated_reference(round_trip, files):
    _, stdout, _ = round_trip["adapt"]
    assert "frozen_probe" in stdout
    assert "baseline" in stdout
    assert "validation_macro_f1" in stdout
    ref = ad.read_h5ad(round_trip["ref_out"])
    assert ref.n_obs == ad.read_h5ad(files["ref"]).n_obs
    assert isinstance(ref.obs[KEY].dtype, pd.CategoricalDtype)
    assert ref.obs[f"{KEY}_confidence"].between(0, 1).all()
    assert set(ref.obs[f"{KEY}_split"]) == {"train", "val", "calibration", "test"}
    assert ref.obsm[f"X_{KEY}"].shape[0] == ref.n_obs
    uns = ref.uns[KEY]
    assert uns["best_strategy"] in {"frozen_probe", "baseline"}
    assert list(uns["strategy_metrics"]["strategy"]) == ["frozen_probe", "baseline"]
    assert uns["params"]["attention_dropout"] == 0
    # the runner and artifacts go beside the output by default, with an absolute runner_dir
    output_dir = round_trip["ref_out"].parent / "ref_annotated_scdlkit"
    runner_dir = Path(uns["runner_dir"])
    assert runner_dir.is_absolute()
    assert runner_dir == (output_dir / "runner").resolve()
    assert f"runner folder: {runner_dir}" in stdout
    assert (output_dir / "strategy_metrics.csv").is_file()
    assert sorted(p.name for p in round_trip["ref_out"].parent.iterdir()) == [
        "ref_annotated.h5ad",
        "ref_annotated_scdlkit",
    ]  # no temporary file left behind


def test_annotate_labels_the_query(round_trip, files):
    _, stdout, _ = round_trip["annotate"]
    assert "AnnData written to" in stdout
    query = ad.read_h5ad(round_trip["query_out"])
    ref = ad.read_h5ad(round_trip["ref_out"])
    assert query.n_obs == ad.read_h5ad(files["query"]).n_obs
    assert set(query.obs[KEY].dropna()) <= set(ref.uns[KEY]["label_categories"])
    assert query.obs[KEY].notna().all()
    assert (query.obs[f"{KEY}_split"] == "query").all()
    assert query.obsm[f"X_{KEY}"].shape[0] == query.n_obs
    assert query.uns[KEY]["best_strategy"] == ref.uns[KEY]["best_strategy"]
    assert query.uns[KEY]["runner_dir"] == ref.uns[KEY]["runner_dir"]


def test_annotate_with_a_missing_runner_exits_2(files, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    argv = ["annotate", str(files["query"]), "--runner", str(tmp_path / "nope"), "-o", str(out)]
    assert main(argv) == 2
    assert "runner folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- atlas scale


def test_embed_backed_streams_and_keeps_everything_else(files, checkpoint_dir, tmp_path):
    in_memory, backed = tmp_path / "in_memory.h5ad", tmp_path / "backed.h5ad"
    base = ["embed", files["query"], "--checkpoint", checkpoint_dir, "--precision", "fp32"]
    assert run([*base, "-o", in_memory])[0] == 0
    code, stdout, stderr = run([*base, "-o", backed, "--backed", "--chunk-size", 37])
    assert code == 0, stderr
    assert "AnnData written to" in stdout
    expected, got = ad.read_h5ad(in_memory), ad.read_h5ad(backed)
    np.testing.assert_allclose(got.obsm["X_scgpt"], expected.obsm["X_scgpt"], rtol=1e-5, atol=1e-6)
    source = ad.read_h5ad(files["query"])
    assert_equal(got.X, source.X)
    pd.testing.assert_frame_equal(got.obs, source.obs)
    assert set(got.obsm) == {*source.obsm, "X_scgpt"}
    assert got.uns["scgpt"]["params"]["precision_used"] == "fp32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_annotate_backed_labels_like_in_memory(round_trip, files, tmp_path):
    runner_dir = ad.read_h5ad(round_trip["ref_out"]).uns[KEY]["runner_dir"]
    out = tmp_path / "query_backed.h5ad"
    argv = ["annotate", files["query"], "--runner", runner_dir, "-o", out, "--backed"]
    code, _, stderr = run([*argv, "--chunk-size", 50])
    assert code == 0, stderr
    got, expected = ad.read_h5ad(out), ad.read_h5ad(round_trip["query_out"])
    pd.testing.assert_series_equal(got.obs[KEY], expected.obs[KEY])
    np.testing.assert_allclose(
        got.obsm[f"X_{KEY}"], expected.obsm[f"X_{KEY}"], rtol=1e-5, atol=1e-6
    )


def test_embed_under_torchrun_matches_one_process(files, checkpoint_dir, tmp_path):
    single, sharded = tmp_path / "single.h5ad", tmp_path / "sharded.h5ad"
    base = ["embed", files["query"], "--checkpoint", checkpoint_dir, "--device", "cpu"]
    base += ["--precision", "fp32"]
    assert run([*base, "-o", single])[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "scdlkit", *map(str, base), "-o", str(sharded)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("AnnData written to") == 1  # rank 0 alone writes
    np.testing.assert_allclose(
        ad.read_h5ad(sharded).obsm["X_scgpt"],
        ad.read_h5ad(single).obsm["X_scgpt"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_adapt_with_held_out_batches(files, checkpoint_dir, tmp_path):
    out = tmp_path / "ref_batches.h5ad"
    code, _, stderr = run(
        [
            "adapt", files["ref"], "--label-key", "bulk_labels", "-o", out,
            "--checkpoint", checkpoint_dir, "--strategies", "baseline",
            "--batch-key", "phase", "--split-by", "batch", "--test-batches", "G2M",
        ]
    )  # fmt: skip
    assert code == 0, stderr
    ref = ad.read_h5ad(out)
    test_cells = ref.obs[f"{KEY}_split"] == "test"
    assert test_cells.any()
    assert set(ref.obs.loc[test_cells, "phase"]) == {"G2M"}
    params = ref.uns[KEY]["params"]
    assert params["batch_key"] == "phase"
    assert params["split_by"] == "batch"
    assert list(params["test_batches"]) == ["G2M"]
    assert list(ref.uns[KEY]["batch_metrics"]["batch"]) == ["G2M"]


def test_adapt_split_by_batch_without_batch_key_exits_2(files, checkpoint_dir, tmp_path):
    out = tmp_path / "never.h5ad"
    argv = ["adapt", files["ref"], "--label-key", "bulk_labels", "-o", out]
    code, _, stderr = run([*argv, "--checkpoint", checkpoint_dir, "--split-by", "batch"])
    assert code == 2
    assert "batch_key" in stderr
    assert not out.exists()


def test_adapt_into_a_folder_with_a_run_needs_overwrite(files, checkpoint_dir, tmp_path):
    argv = [
        "adapt", files["ref"], "--label-key", "bulk_labels", "--checkpoint", checkpoint_dir,
        "--strategies", "baseline", "--output-dir", tmp_path / "run",
    ]  # fmt: skip
    code, _, stderr = run([*argv, "-o", tmp_path / "first.h5ad"])
    assert code == 0, stderr
    code, _, stderr = run([*argv, "-o", tmp_path / "second.h5ad"])
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert "already holds a run" in stderr
    assert "--overwrite" in stderr
    assert not (tmp_path / "second.h5ad").exists()
    code, _, stderr = run([*argv, "-o", tmp_path / "second.h5ad", "--overwrite"])
    assert code == 0, stderr
    assert (tmp_path / "run" / "run_complete.json").exists()
