"""Labels with a stated error rate: split-conformal prediction sets and temperature scaling.

A fitted classifier gives every cell a probability per class. On calibration cells (labelled
cells that neither trained nor chose the model), the nonconformity score of a cell is
``1 - p(its true class)``. For a target ``error_rate`` a and a class ``c`` with ``n`` calibration
cells, the threshold ``q_c`` is the ``ceil((n + 1)(1 - a))``-th smallest of their scores; a new
cell's prediction set holds every class ``c`` with ``1 - p_c <= q_c``. Then, over cells
exchangeable with the calibration cells, the set holds the true class with probability at least
``1 - a`` for each class (class-conditional, "Mondrian", Vovk 2005); with one threshold from all
calibration cells ("marginal"), on average over cells. A class with too few calibration cells for
its own threshold (``ceil((n + 1)(1 - a)) > n``, fewer than ``1/a - 1`` cells) uses the marginal
threshold: it keeps only the marginal guarantee, and the record says which classes did.

The guarantee is about coverage of the set, not about a singleton: a one-class set is not a
certified label, and a cell of a type the reference lacks is not guaranteed an empty or large set.

Temperature scaling (Guo et al. 2017) rescales the log-probabilities by one number fitted on the
same calibration cells (negative log-likelihood; kept only if it does not raise their expected
calibration error); it changes no cell's most probable class. The
prediction sets use the unscaled probabilities, so that the threshold is computed from scores
that did not depend on the calibration cells. Plain numpy: the scores and thresholds are saved
in the runner's safetensors file and recomputed for any a at labelling time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_ERROR_RATE",
    "ConformalCalibration",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_bins",
    "reliability_rows",
]

#: The error rate the comparison reports coverage and set size at (the common choice, 90% sets).
DEFAULT_ERROR_RATE = 0.1
#: Bins of the expected calibration error (equal width over the top probability).
ECE_BINS = 15
_EPS = 1e-12


def reliability_bins(
    proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """Per non-empty equal-width bin of the top probability: its index, the mean top probability
    (``confidence``), the share of its cells whose top class is right (``accuracy``), its cells."""
    proba = np.asarray(proba, dtype=np.float64)
    top = proba.max(axis=1)
    right = proba.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((top * n_bins).astype(np.int64), n_bins - 1)
    return [
        {
            "bin": int(b),
            "confidence": float(top[bins == b].mean()),
            "accuracy": float(right[bins == b].mean()),
            "n_cells": int((bins == b).sum()),
        }
        for b in np.unique(bins)
    ]


def expected_calibration_error(
    proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Top-label expected calibration error: the cell-weighted mean gap between confidence and
    accuracy over ``n_bins`` equal-width bins of the top probability."""
    rows = reliability_bins(proba, labels, n_bins)
    gap = sum(r["n_cells"] * abs(r["confidence"] - r["accuracy"]) for r in rows)
    return float(gap / max(len(proba), 1))


def scale_probabilities(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(proba) / temperature)``: the same ranking within every cell."""
    logits = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] that minimises the negative log-likelihood of ``labels``."""
    # scipy comes with scikit-learn; imported where used
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), _EPS, None))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    best = float(math.exp(found.x))
    return best if nll(math.log(best)) <= nll(0.0) else 1.0  # never worse than no scaling


def _quantile(scores: np.ndarray, error_rate: float) -> float:
    """The ``ceil((n + 1)(1 - a))``-th smallest score; ``inf`` when that rank exceeds ``n``."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - error_rate) - 1e-9)
    if n == 0 or rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


@dataclass
class ConformalCalibration:
    """The calibration cells' scores and labels, and what can be computed from them.

    Attributes
    ----------
    scores
        ``1 - p(true class)`` of every calibration cell (unscaled probabilities).
    labels
        Class code of every calibration cell.
    n_classes
        Classes of the model.
    temperature
        Fitted on the same cells (1: no scaling helped).
    """

    scores: np.ndarray
    labels: np.ndarray
    n_classes: int
    temperature: float = 1.0

    @classmethod
    def fit(cls, proba: np.ndarray, labels: np.ndarray) -> ConformalCalibration:
        """Calibrate on the probabilities and true class codes of calibration cells."""
        proba = np.asarray(proba, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        scores = 1.0 - proba[np.arange(len(labels)), labels]
        temperature = fit_temperature(proba, labels) if len(labels) else 1.0
        # the likelihood's optimum can still be less calibrated on these cells: then no scaling
        scaled = scale_probabilities(proba, temperature)
        if expected_calibration_error(scaled, labels) > expected_calibration_error(proba, labels):
            temperature = 1.0
        return cls(
            scores=scores.astype(np.float64),
            labels=labels,
            n_classes=proba.shape[1],
            temperature=temperature,
        )

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    def thresholds(
        self, error_rate: float, *, mondrian: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-class thresholds, and which classes fell back to the marginal threshold."""
        marginal = _quantile(self.scores, error_rate)
        if not mondrian:
            return np.full(self.n_classes, marginal), np.ones(self.n_classes, dtype=bool)
        out = np.empty(self.n_classes)
        fallback = np.zeros(self.n_classes, dtype=bool)
        for c in range(self.n_classes):
            own = self.scores[self.labels == c]
            q = _quantile(own, error_rate)
            if math.isinf(q):  # too few cells of class c for a threshold of its own
                q, fallback[c] = marginal, True
            out[c] = q
        return out, fallback

    def prediction_sets(
        self, proba: np.ndarray, error_rate: float, *, mondrian: bool = True
    ) -> np.ndarray:
        """Boolean ``(n_cells, n_classes)``: the classes in each cell's prediction set."""
        thresholds, _ = self.thresholds(error_rate, mondrian=mondrian)
        return (1.0 - np.asarray(proba, dtype=np.float64)) <= thresholds[None, :] + 1e-12

    def record(
        self, error_rate: float, categories: list[str], *, mondrian: bool = True
    ) -> dict[str, Any]:
        """JSON-ready description for ``uns``: method, target, cells, per-class thresholds."""
        thresholds, fallback = self.thresholds(error_rate, mondrian=mondrian)
        counts = np.bincount(self.labels, minlength=self.n_classes)
        return {
            "method": "split conformal, class-conditional (Mondrian)"
            if mondrian
            else "split conformal, marginal",
            "error_rate": float(error_rate),
            "n_calibration_cells": int(self.n_cells),
            "temperature": float(self.temperature),
            "classes": [
                {
                    "label": str(name),
                    "n_calibration_cells": int(counts[c]),
                    # inf: too few calibration cells for any threshold, every set holds the class
                    "threshold": float(thresholds[c]),
                    "marginal_fallback": bool(fallback[c]),
                }
                for c, name in enumerate(categories)
            ],
        }

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "scores": self.scores.astype(np.float64),
            "labels": self.labels.astype(np.int64),
            "temperature": np.asarray([self.temperature], dtype=np.float64),
        }

    @staticmethod
    def state_problem(arrays: dict[str, np.ndarray], n_classes: int) -> str | None:
        """What is wrong with saved ``arrays`` (from :meth:`state_arrays`), or ``None``."""
        scores, labels = arrays.get("scores"), arrays.get("labels")
        temperature = arrays.get("temperature")
        if (
            set(arrays) != {"scores", "labels", "temperature"}
            or scores.ndim != 1
            or labels.shape != scores.shape
            or labels.dtype.kind not in "iu"
            or temperature.shape != (1,)
            or not np.isfinite(scores).all()
            or not np.isfinite(temperature).all()
            or float(temperature[0]) <= 0
            or (len(labels) and (labels.min() < 0 or labels.max() >= n_classes))
        ):
            return (
                f"does not hold one score and one class code (of {n_classes}) per calibration "
                "cell and a positive temperature"
            )
        return None

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], n_classes: int) -> ConformalCalibration:
        return cls(
            scores=np.asarray(arrays["scores"], dtype=np.float64),
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            n_classes=n_classes,
            temperature=float(np.asarray(arrays["temperature"]).ravel()[0]),
        )


def conformal_metrics(
    calibration: ConformalCalibration,
    proba: np.ndarray,
    labels: np.ndarray,
    *,
    error_rate: float = DEFAULT_ERROR_RATE,
) -> dict[str, float]:
    """Coverage, mean set size, share of cells without a single label, and expected calibration
    error before and after temperature scaling, on held-out cells."""
    sets = calibration.prediction_sets(proba, error_rate)
    size = sets.sum(axis=1)
    labels = np.asarray(labels, dtype=np.int64)
    return {
        "coverage": float(sets[np.arange(len(labels)), labels].mean()),
        "set_size": float(size.mean()),
        "set_unknown_share": float((size != 1).mean()),
        "ece": expected_calibration_error(proba, labels),
        "ece_scaled": expected_calibration_error(
            scale_probabilities(proba, calibration.temperature), labels
        ),
    }


def reliability_rows(
    strategy: str, proba: np.ndarray, labels: np.ndarray, temperature: float
) -> list[dict[str, Any]]:
    """The reliability diagram's points of one strategy on held-out cells, before and after
    temperature scaling: per bin of the top probability, its mean, the accuracy and the cells."""
    return [
        {"strategy": strategy, "scaled": scaled, **row}
        for scaled, p in ((False, proba), (True, scale_probabilities(proba, temperature)))
        for row in reliability_bins(p, labels)
    ]
