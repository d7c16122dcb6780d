"""Where the tools get their fitted runner: given, loaded from its folder, or from a record.

A record (``uns[key]`` written by :func:`scdlkit.tl.adapt_annotation` or
:func:`scdlkit.tl.annotate`) names the folder and the sha256 of its manifest: the folder is
loaded only if the manifest is still the one recorded, so results always come from the model
the record describes. :func:`scdlkit.tl.annotate` and :func:`scdlkit.tl.annotation_markers`
both load through :func:`resolve_runner`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anndata import AnnData

from scdlkit._shared.persist import MANIFEST_NAME, sha256_file

__all__ = ["check_runner_argument", "refuse_celltypist_names", "resolve_runner"]

#: CellTypist's ``annotate`` arguments that scdlkit names otherwise, and what to pass instead.
CELLTYPIST_NAMES = {
    "model": "pass the runner (a fitted AnnotationRunner, its folder or the reference's record) "
    "as the second argument, runner=",
    "p_thres": "use confidence_threshold= (a cut on the top softmax probability; CellTypist "
    "thresholds one-vs-rest sigmoids, so the same number leaves fewer cells unknown here: see "
    "docs/label_transfer.md)",
    "mode": "there is one mode: every cell gets its most probable label ('best match'); for "
    "'prob match' use confidence_threshold= (one label or unknown_label per cell, never 'A|B')",
    "use_GPU": "use device= ('auto', 'cuda', 'cpu', ...)",
    "transpose_input": "pass cells as rows (adata.T if your matrix is genes x cells)",
}


def check_runner_argument(value: Any) -> None:
    """Refuse an AnnData passed as the runner, naming what to pass instead."""
    if not isinstance(value, AnnData):
        return
    records = [
        (str(key), record)
        for key, record in value.uns.items()
        if isinstance(record, Mapping) and "runner_dir" in record
    ]
    saved = [(key, r) for key, r in records if str(r["runner_dir"]) != "None"]
    if saved:
        key, record = saved[0]
        hint = (
            f"its record, ref.uns[{key!r}] (the model is checked against it), or the folder "
            f"it names, {str(record['runner_dir'])!r}"
        )
    else:
        hint = (
            "the reference's record ref.uns['scgpt_annotation'] (written by "
            "sck.tl.adapt_annotation), the folder the runner was saved to, or the fitted "
            "AnnotationRunner"
        )
    msg = (
        "runner= is an AnnData, not a fitted runner: to label with the reference's model pass "
        f"{hint}."
    )
    raise TypeError(msg)


def refuse_celltypist_names(arguments: Mapping[str, Any]) -> None:
    """A TypeError for any extra keyword argument, naming scdlkit's own for CellTypist's."""
    if not arguments:
        return
    name = next(iter(arguments))
    if name in CELLTYPIST_NAMES:
        msg = f"annotate() has no argument {name!r} (CellTypist's name): {CELLTYPIST_NAMES[name]}."
    else:
        msg = f"annotate() got an unexpected keyword argument {name!r}."
    raise TypeError(msg)


def resolve_runner(runner: Any, checkpoint: Any, device: Any) -> Any:
    """The fitted runner: given, loaded from its folder, or from a record (sha256 checked)."""
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import ScGPTAnnotationRunner

    if isinstance(runner, ScGPTAnnotationRunner):
        return runner
    expected = None
    if isinstance(runner, Mapping):
        runner, expected = recorded_runner(runner)
        if (Path(runner) / MANIFEST_NAME).is_file():  # else loading says what is missing
            check_unchanged(runner, expected, sha256_file(Path(runner) / MANIFEST_NAME))
    _suggest_runner_subfolder(runner)
    runner = ScGPTAnnotationRunner.load(runner, checkpoint=checkpoint, device=device)
    if expected is not None:  # again: the folder may have changed while it was read
        check_unchanged(runner.runner_dir_, expected, runner.manifest_sha256_)
    return runner


def _suggest_runner_subfolder(folder: str | os.PathLike) -> None:
    """A run's ``output_dir`` holds the runner in ``runner/``: say so instead of a bare error."""
    path = Path(folder)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file():
        inner = path / "runner"
        if (inner / MANIFEST_NAME).is_file():
            msg = (
                f"runner={str(folder)!r} holds no {MANIFEST_NAME}, but {str(inner)!r} does: it "
                f"looks like the output_dir of a run; pass {str(inner)!r} (the saved runner)."
            )
            raise FileNotFoundError(msg)


def check_unchanged(folder: str | os.PathLike, expected: str, found: str) -> None:
    """Refuse a runner folder whose manifest is not the one a record was written with."""
    if found != expected:
        msg = (
            f"the runner folder {str(folder)!r} changed since the record was written: its "
            f"manifest has sha256 {found}, the record says {expected}. It now holds another "
            "model; use the folder the record was made with (or pass the folder itself to "
            "accept the new model)."
        )
        raise ValueError(msg)


def recorded_runner(record: Mapping[str, Any]) -> tuple[str, str]:
    """The folder and manifest sha256 of an ``uns`` record written by scdlkit."""
    folder, digest = record.get("runner_dir"), record.get("runner_manifest_sha256")
    if str(folder) == "None" or record.get("runner_saved") is False:
        msg = (
            "runner= is the record of an annotation made with a runner that was never saved "
            "(its runner_dir is 'None'), so there is no folder to load it from. Pass the fitted "
            "AnnotationRunner itself, or save it first (runner.save(folder)) and pass the folder."
        )
        raise ValueError(msg)
    if not isinstance(folder, str) or not isinstance(digest, str) or len(digest) != 64:
        msg = (
            "runner= is a mapping but not an scdlkit record with 'runner_dir' and "
            "'runner_manifest_sha256' (written by sck.tl.adapt_annotation or sck.tl.annotate "
            "from this version on); pass the runner folder or a loaded AnnotationRunner instead."
        )
        raise ValueError(msg)
    return folder, digest
