"""Neural strategies: ``head`` on cached features, ``full_finetune`` and the PEFT methods through
the encoder, all trained by the :class:`~scdlkit.training.Trainer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scdlkit._shared.numeric import softmax
from scdlkit.foundation._annotation_model import (
    DEFAULT_CLASSIFIER_DROPOUT,
    build_annotation_model,
)
from scdlkit.foundation._device import resolve_precision
from scdlkit.foundation._embed import l2_normalise
from scdlkit.foundation._fitting import (
    BaseWeights,
    FitContext,
    PredictInputs,
    StrategyFamily,
    StrategyResult,
    Tensors,
)
from scdlkit.foundation._input_norm import DEFAULT_INPUT_NORM
from scdlkit.foundation._training_settings import step_budget, warn_if_stretched
from scdlkit.foundation.models import model_card

__all__ = ["family_for", "FeatureDataset", "NeuralStrategy"]


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


def family_for(strategy: str) -> NeuralStrategy:
    """The family object of ``strategy`` (its line in ``scdlkit._shared.strategies``)."""
    return NeuralStrategy(strategy)
