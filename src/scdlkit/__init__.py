"""scdlkit: adapt the scGPT foundation model to labelled AnnData for cell-type annotation.

Sub-packages load on first use, so ``import scdlkit as sck`` stays fast: torch is imported only
when a tool that needs it is reached.
"""

from __future__ import annotations

import importlib
from typing import Any

from scdlkit._shared.run_files import register_run_writer
from scdlkit._version import __version__

_SUBMODULES = ("tl", "pl", "foundation", "training", "baselines")
# Top-level aliases re-export; they add no logic.
_ALIASES = {
    "adapt_annotation": ("scdlkit.foundation", "adapt_scgpt_annotation"),
    "inspect_annotation_data": ("scdlkit.foundation", "inspect_annotation_data"),
    "AnnotationRunner": ("scdlkit.foundation", "ScGPTAnnotationRunner"),
    "Trainer": ("scdlkit.training", "Trainer"),
    "TaskRunner": ("scdlkit.baselines", "TaskRunner"),
}

__all__ = ["__version__", *_SUBMODULES, *_ALIASES]


def _write_run_artifacts(runner: Any, folder: Any) -> None:
    # the report and plots import matplotlib and pl: only when a run writes its folder
    from scdlkit._artifacts import write_artifacts

    write_artifacts(runner, folder)


# The model layer draws nothing itself: a runner fitted with output_dir calls the writers
# registered here (scdlkit._shared.run_files), and this package root runs before any sub-package.
register_run_writer(
    "artifacts",
    _write_run_artifacts,
    files=("strategy_metrics.csv", "predictions.csv", "report.md"),
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"scdlkit.{name}")
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    msg = f"module 'scdlkit' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
