"""Strategy families: how a strategy fits, predicts, is saved and is rebuilt; one registry.

Three families cover the eight strategies: frozen ``<cls>`` features with a logistic regression
(``frozen_probe``), the expression baseline (``baseline``, no scGPT) and neural strategies trained
through the :class:`~scdlkit.training.Trainer` (``head`` on frozen features; ``full_finetune`` and
the PEFT methods through the encoder). The runner loops over :func:`strategy_family`; saving asks
the family for its state, loading asks it to rebuild from that state. A new strategy is one
:func:`register_strategy` call (and its name in :mod:`scdlkit._shared.strategies`).
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
from torch.utils.data import Dataset

from scdlkit._shared.numeric import softmax
from scdlkit._shared.splits import stratified_split
from scdlkit._shared.strategies import NEURAL_STRATEGIES, STRATEGIES
from scdlkit._shared.validation import (
    cells_without_expression,
    check_shared_genes,
    gene_names,
    get_matrix,
    validate_values,
)
from scdlkit.foundation._annotation_model import (
    DEFAULT_CLASSIFIER_DROPOUT,
    build_annotation_model,
)
from scdlkit.foundation._data import MIN_GENE_OVERLAP
from scdlkit.foundation._device import resolve_precision
from scdlkit.foundation._embed import l2_normalise
from scdlkit.foundation._input_norm import DEFAULT_INPUT_NORM
from scdlkit.foundation._selection import evaluate_splits
from scdlkit.foundation._training_settings import step_budget, warn_if_stretched
from scdlkit.foundation.models import model_card

__all__ = [
    "BaseWeights",
    "FitContext",
    "PredictInputs",
    "StrategyFamily",
    "StrategyResult",
    "flag_without_expression",
    "label_predictions",
    "query_cells_without_expression",
    "register_strategy",
    "strategy_family",
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


def _prefixed(arrays: Mapping[str, Any], prefix: str) -> Tensors:
    return {f"{prefix}{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _unprefixed(tensors: Tensors, prefix: str) -> dict[str, np.ndarray]:
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
    if family.uses_checkpoint:
        known: Any = checkpoint.readable_genes
        what = f"the {model_card(checkpoint).title} vocabulary"
    else:
        known = set(model.genes_)
        what = f"the {len(known)} genes the baseline was fitted on"
    columns = check_shared_genes(
        names, known, gene_key=gene_key, what=what, min_shared=MIN_GENE_OVERLAP
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


# ------------------------------------------------------------------------------ frozen probe


@dataclass
class ProbeModel:
    """Standardised frozen ``<cls>`` features into a multinomial logistic regression."""

    scaler: Any
    probe: Any

    def predict_proba(self, features: np.ndarray, n_classes: int) -> np.ndarray:
        proba = self.probe.predict_proba(self.scaler.transform(features))
        return full_proba(proba, self.probe.classes_, n_classes)


class FrozenProbe(StrategyFamily):
    """``frozen_probe``: logistic regression on the frozen encoder's ``<cls>`` features."""

    uses_features = True
    reads_features = True
    refit_by_default = True
    state_prefix = "probe."

    def fit(self, strategy: str, ctx: FitContext, settings: dict, config: Any) -> StrategyResult:
        # scikit-learn is imported where used: most sessions never fit a probe
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        train, labels = ctx.fit_cells()
        scaler = StandardScaler().fit(ctx.features[train])
        probe = LogisticRegression(
            max_iter=2000,
            C=1.0,
            class_weight=settings.get("class_weight"),
            random_state=ctx.random_state,
        )
        probe.fit(scaler.transform(ctx.features[train]), labels)
        # lbfgs leaves coef_ in Fortran order and a loaded probe has it in C order: on CPUs whose
        # BLAS picks kernels by layout (AVX-512) the two orders round differently, so predictions
        # before and after save/load would differ in the 7th digit
        probe.coef_ = np.ascontiguousarray(probe.coef_)
        model = ProbeModel(scaler, probe)
        metrics, probabilities = ctx.evaluate(
            lambda _, cells: model.predict_proba(ctx.features[cells], ctx.n_classes)
        )
        return StrategyResult(
            strategy=strategy,
            metrics=metrics,
            trainable_parameters=int(probe.coef_.size + probe.intercept_.size),
            runtime_sec=0.0,
            model=model,
            extra=probabilities,
        )

    def predict(self, model: ProbeModel, inputs: PredictInputs) -> tuple[np.ndarray, np.ndarray]:
        features = inputs.cls_features()
        return model.predict_proba(features, inputs.n_classes), l2_normalise(features)

    def state(self, model: ProbeModel) -> Tensors:
        return _prefixed(
            {
                "coef": model.probe.coef_,
                "intercept": model.probe.intercept_,
                "classes": model.probe.classes_,
                "scaler_mean": model.scaler.mean_,
                "scaler_scale": model.scaler.scale_,
            },
            self.state_prefix,
        )

    def from_state(
        self,
        strategy: str,
        tensors: Tensors,
        manifest: Mapping[str, Any],
        base: BaseWeights,
    ) -> ProbeModel:
        # scikit-learn is imported where used: most sessions never load a probe
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        arrays = _unprefixed(tensors, self.state_prefix)
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(scaler.mean_)
        probe = LogisticRegression()
        probe.coef_, probe.intercept_ = arrays["coef"], arrays["intercept"]
        probe.classes_ = arrays["classes"]
        probe.n_features_in_ = probe.coef_.shape[1]
        return ProbeModel(scaler, probe)

    # -------------------------------------------------------------------------- expression baseline

    def attribution_parts(
        self, model: ProbeModel, n_classes: int, device: torch.device, frozen_encoder: Any
    ) -> tuple[Any, Any, torch.Tensor]:
        scaler, probe = model.scaler, model.probe
        # logits of absent classes stay very low: those cells are never predicted as them
        weight = torch.zeros(n_classes, len(scaler.mean_), dtype=torch.float32)
        bias = torch.full((n_classes,), -1e4, dtype=torch.float32)
        classes = torch.as_tensor(np.asarray(probe.classes_, dtype=np.int64))
        scale = torch.as_tensor(scaler.scale_, dtype=torch.float32)
        weight[classes] = torch.as_tensor(probe.coef_, dtype=torch.float32) / scale
        bias[classes] = torch.as_tensor(probe.intercept_, dtype=torch.float32) - weight[
            classes
        ] @ torch.as_tensor(scaler.mean_, dtype=torch.float32)
        weight, bias = weight.to(device), bias.to(device)
        known = torch.zeros(n_classes, dtype=torch.bool)
        known[classes] = True
        encoder = frozen_encoder().eval()
        return encoder, lambda cls: cls.float() @ weight.T + bias, known.to(device)


class ExpressionBaseline(StrategyFamily):
    """``baseline``: logistic regression on log-normalised expression; no scGPT."""

    attribution_method = "linear_attribution"

    uses_checkpoint = False
    refit_by_default = True
    state_prefix = "baseline."

    def fit(self, strategy: str, ctx: FitContext, settings: dict, config: Any) -> StrategyResult:
        # scdlkit.baselines imports the Trainer (lightning_fabric): only when the baseline runs
        from scdlkit.baselines._expression import ExpressionLogisticBaseline

        matrix, genes = ctx.expression()
        train, labels = ctx.fit_cells()
        model = ExpressionLogisticBaseline(
            random_state=ctx.random_state, class_weight=settings.get("class_weight")
        ).fit(matrix[train], genes, labels)
        metrics, probabilities = ctx.evaluate(
            lambda _, cells: full_proba(
                model.predict_proba(matrix[cells], genes), model.classifier_.classes_, ctx.n_classes
            )
        )
        return StrategyResult(
            strategy=strategy,
            metrics=metrics,
            trainable_parameters=model.n_parameters,
            runtime_sec=0.0,
            model=model,
            extra=probabilities,
        )

    def predict(self, model: Any, inputs: PredictInputs) -> tuple[np.ndarray, np.ndarray]:
        matrix, genes = inputs.expression()
        proba = full_proba(
            model.predict_proba(matrix, genes), model.classifier_.classes_, inputs.n_classes
        )
        return proba, model.latent(matrix, genes)

    def state(self, model: Any) -> Tensors:
        return _prefixed(model.state_arrays(), self.state_prefix)

    def manifest_fields(self, model: Any) -> dict[str, Any]:
        return {"baseline_genes": list(model.genes_)}

    def from_state(
        self,
        strategy: str,
        tensors: Tensors,
        manifest: Mapping[str, Any],
        base: BaseWeights,
    ) -> Any:
        # scdlkit.baselines imports the Trainer (lightning_fabric): only for a baseline runner
        from scdlkit.baselines._expression import ExpressionLogisticBaseline

        arrays = _unprefixed(tensors, self.state_prefix)
        return ExpressionLogisticBaseline.from_state(arrays, manifest["baseline_genes"])


# ------------------------------------------------------------------------------------ neural


class FeatureDataset(Dataset):
    """Precomputed ``<cls>`` features and labels, for the frozen ``head`` strategy."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "labels": int(self.labels[i])}

    def get_batch(self, indices: Any) -> dict[str, torch.Tensor]:
        """The collated batch of ``indices`` in one indexing operation (the Trainer's protocol)."""
        rows = np.asarray(indices, dtype=np.int64)
        return {
            "features": self.features[torch.from_numpy(rows)],
            "labels": torch.from_numpy(self.labels[rows]),
        }


class NeuralStrategy(StrategyFamily):
    """Classifier head (``head``, on frozen features) or an adapted encoder, trained by the
    :class:`~scdlkit.training.Trainer`; the epoch with the lowest validation loss is kept."""

    #: every neural strategy standardises its classifier input on the frozen training features
    reads_features = True
    saves_model_config = True

    def __init__(self, strategy: str) -> None:
        self.uses_features = strategy == "head"
        self.moves_to_device = not self.uses_features  # the head predicts on cached features

    def fit(self, strategy: str, ctx: FitContext, settings: dict, config: Any) -> StrategyResult:
        # the Trainer brings lightning_fabric, slow to import: only when a strategy trains
        from scdlkit.training import Trainer, TrainingDivergedError

        model = build_annotation_model(
            ctx.encoder_state,
            ctx.checkpoint,
            num_classes=ctx.n_classes,
            tuning_strategy=strategy,
            strategy_config=config,
            label_categories=ctx.label_categories,
            seed=ctx.random_state,
            input_norm=settings.get("input_norm", DEFAULT_INPUT_NORM),
            classifier_dropout=settings.get("classifier_dropout", DEFAULT_CLASSIFIER_DROPOUT),
        )
        batch_size = settings.get("batch_size", ctx.batch_size)  # a recipe's, or the runner's
        fit_cells, stop_cells = ctx.early_stopping_split()
        steps_per_epoch = -(-len(fit_cells) // batch_size)
        warn_if_stretched(
            strategy,
            settings,
            steps_per_epoch,
            n_cells=len(fit_cells),
            batch_size=batch_size,
            once_per=ctx.prepared,  # the same for every repeat of one fit
        )
        budget = step_budget(settings, steps_per_epoch)
        for name in ("input_norm", "classifier_dropout", "batch_size"):  # not the Trainer's
            budget.pop(name, None)
        encoder_dropout = budget.pop("encoder_dropout", None)
        if encoder_dropout is not None:
            model_card(ctx.checkpoint).set_dropout(model.encoder, encoder_dropout)
        if ctx.attention_dropout is not None:
            model_card(ctx.checkpoint).set_attention_dropout(model, ctx.attention_dropout)
        trainer = Trainer(
            model,
            batch_size=batch_size,
            accelerator=ctx.device.type,
            devices=1,
            precision=resolve_precision(ctx.precision, ctx.device),
            seed=ctx.random_state,
            # a head on cached features: operations too small to share between CPU threads
            num_threads=1 if self.uses_features and ctx.device.type == "cpu" else None,
            progress=ctx.progress,
            **budget,
        )
        cells = {
            "fit": fit_cells,
            "stop": stop_cells,
            "val": ctx.cells("val")[0],
            "test": ctx.cells("test")[0],
            "calibration": ctx.cells("calibration")[0],
        }
        codes = ctx.prepared.label_codes
        # "frozen": the frozen <cls> outputs share a large common component; standardising the
        # classifier input on them lets the classifier read the cell-to-cell differences.
        # "batch": its running statistics start at the frozen encoder's; "layernorm": no-op
        model.feature_norm.fit(torch.as_tensor(ctx.features[fit_cells]))
        if self.uses_features:
            datasets = {k: FeatureDataset(ctx.features[c], codes[c]) for k, c in cells.items()}
        else:
            datasets = {k: ctx.prepared.dataset(c) for k, c in cells.items()}
        try:
            trainer.fit(datasets["fit"], datasets["stop"] if len(stop_cells) else None)
        except TrainingDivergedError as err:
            msg = (
                f"strategy {strategy!r}: {err} Set its rate with lr= (every neural strategy) or "
                f"training={{{strategy!r}: {{'lr': ...}}}}; on the command line, --lr."
            )
            raise TrainingDivergedError(msg) from None
        model = model.to("cpu").eval()
        metrics, probabilities = ctx.evaluate(
            lambda split, _: trainer.predict(datasets[split])["probabilities"]
        )
        return StrategyResult(
            strategy=strategy,
            metrics=metrics,
            trainable_parameters=model.trainable_parameter_count(),
            runtime_sec=0.0,
            history=trainer.history_,
            config=None if model.strategy_config is None else model.strategy_config.to_dict(),
            training={**settings, "trainer": budget},
            model=model,
            extra={**probabilities, "best_step": trainer.best_step_},
        )

    def predict(self, model: Any, inputs: PredictInputs) -> tuple[np.ndarray, np.ndarray]:
        n_classes = inputs.n_classes
        if self.uses_features:
            features = inputs.cls_features()
            with torch.inference_mode():
                logits = model({"features": torch.as_tensor(features)})["logits"].numpy()
            return softmax(logits), l2_normalise(features)
        model = model.to(inputs.device).eval()

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            out = model(batch)
            return torch.cat([out["logits"].float(), out["latent"].float()], dim=1)

        joined = inputs.encode(forward, "predicting")
        model.to("cpu")
        return softmax(joined[:, :n_classes]), l2_normalise(joined[:, n_classes:])

    def state(self, model: Any) -> Tensors:
        return {
            f"{self.state_prefix}{k}": v.detach().cpu().contiguous()
            for k, v in model.adaptation_state_dict().items()
        }

    def manifest_fields(self, model: Any) -> dict[str, Any]:
        return {"model_config": model.config_dict()}

    def from_state(
        self,
        strategy: str,
        tensors: Tensors,
        manifest: Mapping[str, Any],
        base: BaseWeights,
    ) -> Any:
        model = build_annotation_model(
            base.encoder_state(), base.checkpoint, **manifest["model_config"]
        )
        model.load_adaptation_state_dict(
            {
                k[len(self.state_prefix) :]: v
                for k, v in tensors.items()
                if k.startswith(self.state_prefix)
            }
        )
        return model.eval()

    def encoder_of(self, model: Any) -> Any:
        return model.encoder if self.uses_features else None

    def attribution_parts(
        self, model: Any, n_classes: int, device: torch.device, frozen_encoder: Any
    ) -> tuple[Any, Any, torch.Tensor]:
        model = model.to(device).eval()
        known = torch.ones(n_classes, dtype=torch.bool, device=device)
        return model.encoder, lambda cls: model.cls_decoder(model.feature_norm(cls)), known


# ---------------------------------------------------------------------------------- registry

_FAMILIES: dict[str, StrategyFamily] = {}


def register_strategy(name: str, family: StrategyFamily) -> None:
    """Make ``family`` the one that fits, predicts and saves strategy ``name``."""
    if name not in STRATEGIES:
        msg = f"{name!r} is not a strategy name of scdlkit._shared.strategies.STRATEGIES."
        raise ValueError(msg)
    _FAMILIES[name] = family


def strategy_family(name: str) -> StrategyFamily:
    """The family registered for strategy ``name``."""
    try:
        return _FAMILIES[name]
    except KeyError:
        msg = f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg) from None


register_strategy("frozen_probe", FrozenProbe())
register_strategy("baseline", ExpressionBaseline())
for _name in NEURAL_STRATEGIES:
    register_strategy(_name, NeuralStrategy(_name))
