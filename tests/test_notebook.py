"""The annotation tutorial notebook: it runs end to end, and its stored outputs suit the docs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "annotation_tutorial.ipynb"
MAX_BYTES = 1_500_000


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _cell_with(nb, text: str):
    return next(cell for cell in _code_cells(nb) if text in cell.source)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


def _check_outputs(nb) -> None:
    """What the docs page and a reader rely on, in an executed notebook."""
    for cell in _code_cells(nb):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    assert "ok: False" in _stdout(_cell_with(nb, "sck.tl.inspect(pbmc"))
    assert "PROBLEM: values are negative" in _stdout(_cell_with(nb, "sck.tl.inspect(pbmc"))
    assert "best strategy:" in _stdout(_cell_with(nb, 'print("best strategy:"'))
    for plot in (
        "sck.pl.strategy_comparison",
        "sck.pl.confusion_matrix",
        "sck.pl.training_history",
        "sc.pl.umap",
    ):
        assert _has_image(_cell_with(nb, plot)), plot
    assert "identical predictions after reloading: True" in _stdout(
        _cell_with(nb, "sck.AnnotationRunner.load")
    )


def test_stored_notebook_has_outputs_and_stays_small():
    nbformat = pytest.importorskip("nbformat")
    assert NOTEBOOK.stat().st_size < MAX_BYTES
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first = _code_cells(nb)[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert 'os.environ.get("SCDLKIT_TUTORIAL_CHECKPOINT", "whole-human")' in first.source
    assert all(cell.execution_count is not None for cell in _code_cells(nb))
    _check_outputs(nb)
    # no paths of the machine it was run on
    text = NOTEBOOK.read_text()
    for private in ("/tmp/", "/work/", "/home/", "/root/"):
        assert private not in text, private


def test_missing_checkpoint_falls_back_loudly(tmp_path, monkeypatch, capsys):
    """The checkpoint cell, run alone: no checkpoint -> a random one and a loud warning."""
    nbformat = pytest.importorskip("nbformat")
    import anndata as ad
    import numpy as np

    from scdlkit.demo import write_random_checkpoint
    from scdlkit.foundation import resolve_checkpoint

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = _cell_with(nb, "write_random_checkpoint(")
    pbmc = ad.AnnData(np.zeros((2, 3), np.float32))
    pbmc.var_names = ["CD3E", "MS4A1", "LYZ"]
    pbmc.raw = pbmc
    namespace = {
        "CHECKPOINT": str(tmp_path / "no-such-checkpoint"),
        "EPOCHS": None,
        "OUTPUT_DIR": "out",
        "Path": Path,
        "pbmc": pbmc,
        "resolve_checkpoint": resolve_checkpoint,
        "write_random_checkpoint": write_random_checkpoint,
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(cell.source, "checkpoint-cell", "exec"), namespace)
    stdout = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in stdout
    assert "NOTHING biologically" in stdout
    assert resolve_checkpoint(namespace["checkpoint"]).path == (
        tmp_path / "out" / "random_checkpoint"
    )
    assert namespace["EPOCHS"] == 3


@pytest.mark.slow
def test_notebook_runs(tmp_path, checkpoint_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("SCDLKIT_TUTORIAL_CHECKPOINT", str(checkpoint_dir))
    monkeypatch.setenv("SCDLKIT_TUTORIAL_EPOCHS", "1")
    monkeypatch.setenv("SCDLKIT_TUTORIAL_FAST", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets the kernel's debugger
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs = []
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",  # jupyter_client runs the "python" of this kernel as sys.executable
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the notebook's working folder
    )
    client.execute()
    assert _stdout(nb.cells[-1]).strip() == sys.prefix  # the kernel ran in this environment
    _check_outputs(nb)
    out = tmp_path / "scdlkit_tutorial"
    assert (out / "runner" / "manifest.json").is_file()
    assert (out / "reference_annotated.h5ad").is_file()
    assert (out / "query_annotated.h5ad").is_file()
