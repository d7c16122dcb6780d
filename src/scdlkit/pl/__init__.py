"""Plots of what the ``sck.tl`` tools wrote into the AnnData (``sc.pl`` conventions).

Each plot takes ``ax=None`` (draw into given axes), ``show=None``, ``return_fig=False`` and
``save=None`` (a path), like ``scanpy.pl``, and reads only ``adata.obs``/``adata.uns`` slots
written by :func:`scdlkit.tl.adapt_annotation`.
"""

from scdlkit.pl._batch_metrics import batch_metrics
from scdlkit.pl._confusion_matrix import confusion_matrix
from scdlkit.pl._strategy_comparison import strategy_comparison
from scdlkit.pl._training_history import training_history

__all__ = ["batch_metrics", "confusion_matrix", "strategy_comparison", "training_history"]
