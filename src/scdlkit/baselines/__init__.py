"""Plain baselines without a foundation model.

- :class:`TaskRunner`: MLP classifier, autoencoder and VAE on standardised log-expression,
  trained with the shared :class:`~scdlkit.training.Trainer` (``sck.TaskRunner``).
- :class:`ExpressionLogisticBaseline`: logistic regression on log-normalised expression (the
  ``baseline`` strategy of the annotation runner).
- The models (:class:`MLPClassifier`, :class:`AutoEncoder`, :class:`VAE`) and representation
  metrics (:func:`knn_label_consistency`, :func:`silhouette`) for use on their own.
"""

from scdlkit._shared.splits import stratified_split
from scdlkit.baselines._expression import ExpressionLogisticBaseline, log_normalised_matrix
from scdlkit.baselines._metrics import knn_label_consistency, silhouette
from scdlkit.baselines._models import VAE, AutoEncoder, MLPClassifier
from scdlkit.baselines._task_runner import TaskRunner

__all__ = [
    "VAE",
    "AutoEncoder",
    "ExpressionLogisticBaseline",
    "MLPClassifier",
    "TaskRunner",
    "knn_label_consistency",
    "log_normalised_matrix",
    "silhouette",
    "stratified_split",
]
