"""Generic training on Lightning Fabric, and classification metrics.

This layer knows nothing about scGPT: :class:`Trainer` fits any model that follows the batch and
output protocol described in :mod:`scdlkit.training._trainer`, and :mod:`~scdlkit.training.metrics`
summarises predictions in a form that is always defined (``None`` instead of ``NaN``).

Names load on first use: the Trainer brings Lightning Fabric and the metrics scikit-learn, both
slow to import, so the argument checks (:mod:`scdlkit.training._checks`) can be read without them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Trainer": "scdlkit.training._trainer",
    "TrainingDivergedError": "scdlkit.training._schedule",
    "resolve_precision": "scdlkit.training._precision",
    "classification_metrics": "scdlkit.training.metrics",
    "confusion_matrix": "scdlkit.training.metrics",
    "json_safe": "scdlkit.training.metrics",
    "per_class_metrics": "scdlkit.training.metrics",
}

__all__ = [
    "Trainer",
    "TrainingDivergedError",
    "classification_metrics",
    "confusion_matrix",
    "json_safe",
    "metrics",
    "per_class_metrics",
    "resolve_precision",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name == "metrics":
        # on first use: Lightning Fabric and scikit-learn are slow to import
        module = importlib.import_module(_LAZY.get(name, "scdlkit.training.metrics"))
        return module if name == "metrics" else getattr(module, name)
    msg = f"module 'scdlkit.training' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
