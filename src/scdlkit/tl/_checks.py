"""Checks the tools run on their arguments before any work (types, ranges, fitted runners).

The number and flag checks are :mod:`scdlkit._shared.arguments`; these are the ones only the
tools need: strings, paths, devices, runners and the AnnData itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from anndata import AnnData

from scdlkit._shared.arguments import check_int
from scdlkit.tl._runner_source import check_runner_argument

__all__ = [
    "check_checkpoint",
    "check_device",
    "check_fitted_runner",
    "check_has_cells",
    "check_optional_path",
    "check_optional_str",
    "check_random_state",
    "check_runner",
    "check_str",
]


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_str(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str):
        msg = f"{name} must be a string, got {_got(value)}."
        raise TypeError(msg)
    if not value:
        msg = f"{name} must be a non-empty string."
        raise ValueError(msg)
    return value


def check_optional_str(name: str, value: Any) -> str | None:
    """:func:`check_str`, with ``None`` passed through."""
    return None if value is None else check_str(name, value)


def check_optional_path(name: str, value: Any) -> str | os.PathLike | None:
    """``value`` if it is ``None``, a non-empty string or an ``os.PathLike``."""
    if value is None or isinstance(value, os.PathLike):
        return value
    if isinstance(value, str):
        return check_str(name, value)
    msg = f"{name} must be a folder path (str or pathlib.Path) or None, got {_got(value)}."
    raise TypeError(msg)


def check_checkpoint(name: str, value: Any, *, optional: bool = False) -> Any:
    """A checkpoint name, folder or resolved checkpoint of a registered model."""
    # scdlkit.foundation brings torch: imported when a tool runs, as the tools do
    from scdlkit.foundation import is_model_checkpoint

    if is_model_checkpoint(value) or (optional and value is None):
        return value
    if isinstance(value, str | os.PathLike):
        return check_optional_path(name, value)
    allowed = "an official checkpoint name, a checkpoint folder" + (" or None" if optional else "")
    msg = f"{name} must be {allowed}, got {_got(value)}."
    raise TypeError(msg)


def check_device(value: Any) -> Any:
    """``"auto"``, a torch device string (``"cpu"``, ``"cuda:0"``, ...) or a ``torch.device``."""
    import torch

    if isinstance(value, torch.device) or value == "auto":
        return value
    if not isinstance(value, str):
        msg = f"device must be 'auto', a torch device string or a torch.device, got {_got(value)}."
        raise TypeError(msg)
    try:
        torch.device(value)
    except RuntimeError as err:
        msg = f"device={value!r} is not a device: use 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'."
        raise ValueError(msg) from err
    return value


def check_random_state(value: Any) -> int:
    """A seed: a non-negative integer (numpy integers too)."""
    return check_int("random_state", value, min_value=0)


def check_has_cells(adata: Any, tool: str) -> None:
    """Refuse an AnnData with no cells, which no tool can give results for."""
    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    if adata.n_obs == 0:
        msg = (
            f"adata has 0 cells: sck.tl.{tool} has nothing to work on. Check the subset "
            "(e.g. `adata[mask]` with a mask that selects no cell) before calling it."
        )
        raise ValueError(msg)


def check_runner(value: Any, *, records: bool = False) -> Any:
    """A fitted runner, a folder it was saved to (``str``/``PathLike``) or, with ``records``,
    an ``uns`` record written by scdlkit (checked later)."""
    # scdlkit.foundation brings torch: imported when a tool runs, as the tools do
    from scdlkit.foundation import ScGPTAnnotationRunner

    if isinstance(value, ScGPTAnnotationRunner):
        return check_fitted_runner(value)
    check_runner_argument(value)
    if isinstance(value, Mapping) and records:
        return value
    if isinstance(value, str | os.PathLike):
        return check_optional_path("runner", value)
    accepted = "a fitted AnnotationRunner, the folder it was saved to"
    accepted += ", or the uns record of the annotation" if records else ""
    msg = f"runner must be {accepted}; got {_got(value)}."
    raise TypeError(msg)


def check_fitted_runner(runner: Any) -> Any:
    """``runner`` if it is fitted (or loaded), else an error saying to fit it first."""
    if not getattr(runner, "_fitted", False):
        msg = (
            "runner is not fitted: call runner.fit(reference) first (or use "
            "sck.tl.adapt_annotation, or AnnotationRunner.load(folder))."
        )
        raise ValueError(msg)
    return runner
