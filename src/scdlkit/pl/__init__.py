"""Plots of what the ``sck.tl`` tools wrote into the AnnData (``sc.pl`` conventions).

Each plot takes ``ax=None`` (draw into given axes), ``show=None``, ``return_fig=False`` and
``save=None`` (a path), like ``scanpy.pl``, and reads only ``adata.obs``/``adata.uns`` slots
written by :func:`scdlkit.tl.adapt_annotation`, :func:`scdlkit.tl.annotate` and
:func:`scdlkit.tl.annotation_markers`.
"""

from scdlkit.pl._annotation_markers import annotation_markers
from scdlkit.pl._batch_metrics import batch_metrics
from scdlkit.pl._calibration import calibration
from scdlkit.pl._confusion_matrix import confusion_matrix
from scdlkit.pl._label_transfer import label_transfer
from scdlkit.pl._strategy_comparison import strategy_comparison
from scdlkit.pl._training_history import training_history

__all__ = [
    "annotation_markers",
    "batch_metrics",
    "calibration",
    "confusion_matrix",
    "label_transfer",
    "strategy_comparison",
    "training_history",
]
