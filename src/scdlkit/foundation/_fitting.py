"""What every strategy family shares: the fit context, the result, the family contract.

A family (:class:`StrategyFamily`) says how a strategy fits, predicts, is saved and is rebuilt;
the families themselves and the one strategy table are in :mod:`scdlkit.foundation.strategies`.
The runner loops over ``strategy_family(name)``; saving asks the family for its state, loading
asks it to rebuild from that state.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdlkit._shared.splits import stratified_split
from scdlkit._shared.validation import (
    cells_without_expression,
    check_shared_genes,
    gene_names,
    get_matrix,
    validate_values,
)
from scdlkit.foundation._data import MIN_GENE_OVERLAP
from scdlkit.foundation._selection import evaluate_splits
from scdlkit.foundation.models import model_card

__all__ = [
    "BaseWeights",
    "FitContext",
    "PredictInputs",
    "StrategyFamily",
    "StrategyResult",
    "flag_without_expression",
    "full_proba",
    "label_predictions",
    "prefixed_state",
    "query_cells_without_expression",
    "unprefixed_state",
]

Tensors = dict[str, torch.Tensor]


@dataclass
class StrategyResult:
    """One fitted strategy: its metrics and the model that predicts with it."""

    strategy: str
    metrics: dict[str, Any]
    trainable_parameters: int
    runtime_sec: float
    history: pd.DataFrame | None = None
    config: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@dataclass
class FitContext:
    """What one runner fit computes once and every strategy reads.

    ``expression()`` returns the log-normalised matrix and gene names (read once, on first use);
    ``features`` are the frozen encoder's ``<cls>`` outputs of every cell (``None`` when no
    strategy needs them); ``encoder_state`` is the checkpoint's state dict.
    """

    prepared: Any
    split: Any
    label_categories: list[str]
    checkpoint: Any
    encoder_state: dict[str, torch.Tensor] | None
    features: np.ndarray | None
    expression: Callable[[], tuple[Any, pd.Index]]
    device: torch.device
    precision: str
    batch_size: int
    random_state: int
    attention_dropout: float | None
    progress: bool
    confidence_threshold: float | None = None
    early_stopping_fraction: float = 0.15

    @property
    def n_classes(self) -> int:
        return len(self.label_categories)

    def cells(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Cell positions and label codes of ``"train"``, ``"val"``, ``"test"`` or
        ``"calibration"``."""
        cells = self.split.indices(split)
        return cells, self.prepared.label_codes[cells]

    def evaluate(
        self, proba_for: Callable[[str, np.ndarray], np.ndarray]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray | None]]:
        """Validation and test metrics, and the test and calibration cells' probabilities."""
        metrics, test = evaluate_splits(
            self.cells, proba_for, self.n_classes, self.confidence_threshold
        )
        cells, _ = self.cells("calibration")
        calibration = proba_for("calibration", cells) if len(cells) else None
        return metrics, {"test_probabilities": test, "calibration_probabilities": calibration}

    def fit_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions and label codes of the cells every strategy is fitted on.

        The training cells less the early-stopping cells (:meth:`early_stopping_split`): a
        closed-form fit (``frozen_probe``, ``baseline``) needs no stopping cells but is fitted on
        the same cells as the neural strategies, so that no strategy sees more training cells
        than another.
        """
        fit, _ = self.early_stopping_split()
        return fit, self.prepared.label_codes[fit]

    def early_stopping_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Training cells split into cells to fit on and cells to stop early on.

        Early stopping must not look at the validation cells the strategies are ranked on (a
        strategy that picked its best epoch on them would be favoured), so it uses a stratified
        ``early_stopping_fraction`` of the training cells instead.
        """
        train, labels = self.cells("train")
        if self.early_stopping_fraction == 0:
            return train, train[:0]
        parts, _ = stratified_split(
            train,
            labels,
            val_size=self.early_stopping_fraction,
            test_size=0.0,
            random_state=self.random_state,
        )
        return parts["train"], parts["val"]


@dataclass
class PredictInputs:
    """What a family may read to label cells.

    ``encode(forward, desc)`` runs a batch function over every cell's tokens; ``cls_features()``
    gives the frozen encoder's ``<cls>`` outputs (precomputed or encoded on first use);
    ``expression()`` the log-normalised matrix and gene names.
    """

    encode: Callable[[Callable, str], np.ndarray]
    cls_features: Callable[[], np.ndarray]
    expression: Callable[[], tuple[Any, pd.Index]]
    device: torch.device
    n_classes: int


@dataclass
class BaseWeights:
    """The base checkpoint of a saved runner; its weights are read on first use, once."""

    checkpoint: Any
    _state: dict[str, torch.Tensor] | None = None

    def encoder_state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = model_card(self.checkpoint).read_weights(self.checkpoint)
        return self._state


class StrategyFamily:
    """How the strategies of one family fit, predict, save and rebuild.

    Attributes
    ----------
    uses_features
        Fits and predicts on the frozen encoder's ``<cls>`` features (computed once per fit).
    reads_features
        Needs those features when fitting (to fit on, or to standardise the classifier input).
    uses_checkpoint
        Needs the scGPT checkpoint's weights.
    refit_by_default
        Refitted on every labelled cell after selection under ``refit="auto"`` (a closed-form
        fit that chose nothing on held-out cells; :mod:`scdlkit.foundation._final_model`).
    state_prefix
        Prefix of every tensor :meth:`state` saves (how a saved runner's weights are checked).
    saves_model_config
        :meth:`manifest_fields` writes a ``model_config`` that rebuilds an annotation model.
    moves_to_device
        Its model is moved to the device to predict (and back to the CPU after).
    """

    uses_features = False
    reads_features = False
    uses_checkpoint = True
    refit_by_default = False
    state_prefix = "model."
    saves_model_config = False
    moves_to_device = False

    def fit(self, strategy: str, ctx: FitContext, settings: dict, config: Any) -> StrategyResult:
        raise NotImplementedError

    def predict(self, model: Any, inputs: PredictInputs) -> tuple[np.ndarray, np.ndarray]:
        """``(probabilities (n_cells, n_classes), latent)`` for every cell.

        An scGPT latent is L2-normalised, as :func:`scdlkit.tl.embed` and upstream do.
        """
        raise NotImplementedError

    def state(self, model: Any) -> Tensors:
        """The tensors to save (only what the base checkpoint does not hold)."""
        raise NotImplementedError

    def manifest_fields(self, model: Any) -> dict[str, Any]:
        """JSON fields the manifest needs to rebuild the model beside :meth:`state`."""
        return {}

    def from_state(
        self,
        strategy: str,
        tensors: Tensors,
        manifest: Mapping[str, Any],
        base: BaseWeights,
    ) -> Any:
        """Rebuild the fitted model from :meth:`state` and the manifest."""
        raise NotImplementedError

    def encoder_of(self, model: Any) -> Any:
        """The frozen base encoder held by ``model``, if it holds one."""
        return None

    #: How :func:`~scdlkit.foundation._attribution.class_gene_scores` explains the model:
    #: ``"integrated_gradients"`` through the encoder, or ``"linear_attribution"`` (exact for a
    #: model linear in the expression it reads).
    attribution_method = "integrated_gradients"

    def attribution_parts(
        self, model: Any, n_classes: int, device: torch.device, frozen_encoder: Any
    ) -> tuple[Any, Any, torch.Tensor]:
        """``(encoder, cell embedding -> logits, classes the model knows)`` for attributions.

        ``frozen_encoder`` is a callable returning the pretrained encoder (built on first use).
        """
        msg = f"{type(self).__name__} is not explained through an encoder."
        raise NotImplementedError(msg)


def prefixed_state(arrays: Mapping[str, Any], prefix: str) -> Tensors:
    return {f"{prefix}{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def unprefixed_state(tensors: Tensors, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}


def full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class, also those absent from the training split (probability 0)."""
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float32)
    out[:, np.asarray(classes)] = proba
    return out


def label_predictions(
    probabilities: np.ndarray,
    latent: np.ndarray,
    categories: list[str],
    threshold: float | None,
    unknown: str,
) -> dict[str, np.ndarray]:
    """Codes and labels of the most probable class; below ``threshold``, code -1 and ``unknown``."""
    codes = probabilities.argmax(axis=1).astype(np.int64)
    labels = np.asarray(categories, dtype=object)[codes]
    if threshold is not None:
        unsure = probabilities.max(axis=1) < threshold
        codes[unsure] = -1
        labels[unsure] = unknown
    return {
        "label_codes": codes,
        "labels": labels,
        "probabilities": probabilities.astype(np.float32),
        "latent": np.asarray(latent, dtype=np.float32),
    }


def query_cells_without_expression(
    adata: Any,
    gene_key: str | None,
    layer: str | None,
    *,
    family: StrategyFamily,
    checkpoint: Any,
    model: Any,
) -> np.ndarray:
    """Check a query as every strategy needs it, before any work; its cells with no expressed
    gene among those the kept model reads.

    Values must be counts or log-normalised (finite, not negative) and enough genes must be shared
    with what the model reads: the foundation model's vocabulary (its checkpoint's
    ``readable_genes``), the fitted genes for the expression baseline.
    """
    validate_values(adata, layer)
    names = gene_names(adata, gene_key)
    capacity = None
    if family.uses_checkpoint:
        # the model's own matching (Geneformer maps symbols to Ensembl ids, say)
        card = model_card(checkpoint)
        known: Any = set(map(str, card.match_genes(adata, checkpoint, gene_key).matched))
        what = f"the {card.title} vocabulary"
        capacity = len(checkpoint.readable_genes)  # what the model could read, not the query
    else:
        known = set(model.genes_)
        what = f"the {len(known)} genes the baseline was fitted on"
    columns = check_shared_genes(
        names, known, gene_key=gene_key, what=what, min_shared=MIN_GENE_OVERLAP, capacity=capacity
    )
    return cells_without_expression(get_matrix(adata, layer), columns)


def flag_without_expression(
    predictions: dict[str, np.ndarray], silent: np.ndarray, unknown: str
) -> dict[str, np.ndarray]:
    """Cells with no expressed gene the model reads get the ``unknown`` label and uniform
    probabilities: a model's answer for them would be its prior, not the cell."""
    predictions["no_expression"] = silent
    if not silent.any():
        return predictions
    n_classes = predictions["probabilities"].shape[1]
    predictions["probabilities"][silent] = 1.0 / n_classes
    predictions["label_codes"][silent] = -1
    predictions["labels"] = predictions["labels"].astype(object)
    predictions["labels"][silent] = unknown
    msg = (
        f"{int(silent.sum())} of {len(silent)} cells have no expressed gene among those the "
        f"model reads; they are labelled {unknown!r} with uniform probabilities. "
        "Filter such cells first (e.g. sc.pp.filter_cells(adata, min_genes=1))."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)  # at the caller of predict
    return predictions


def read_once(read: Any) -> Any:
    """``read`` called on first use only; later calls return the same result."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            cache.append(read())
        return cache[0]

    return get


def expression_of(adata: Any, gene_key: str | None, layer: str | None) -> tuple[Any, pd.Index]:
    """The log-normalised matrix and gene names the expression baseline reads."""
    # scdlkit.baselines imports the Trainer (lightning_fabric): only when the baseline runs
    from scdlkit.baselines._expression import log_normalised_matrix

    return log_normalised_matrix(adata, layer), gene_names(adata, gene_key)
