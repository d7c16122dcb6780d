"""Generic training on Lightning Fabric, and classification metrics.

This layer knows nothing about scGPT: :class:`Trainer` fits any model that follows the batch and
output protocol described in :mod:`scdlkit.training._trainer`, and :mod:`~scdlkit.training.metrics`
summarises predictions in a form that is always defined (``None`` instead of ``NaN``).
"""

from scdlkit.training import metrics
from scdlkit.training._precision import resolve_precision
from scdlkit.training._trainer import Trainer
from scdlkit.training.metrics import (
    classification_metrics,
    confusion_matrix,
    json_safe,
    per_class_metrics,
)

__all__ = [
    "Trainer",
    "classification_metrics",
    "confusion_matrix",
    "json_safe",
    "metrics",
    "per_class_metrics",
    "resolve_precision",
]
