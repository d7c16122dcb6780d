"""``frozen_probe``: a logistic regression on the frozen encoder's ``<cls>`` features."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scdlkit.foundation._embed import l2_normalise
from scdlkit.foundation._fitting import (
    BaseWeights,
    FitContext,
    PredictInputs,
    StrategyFamily,
    StrategyResult,
    Tensors,
    full_proba,
    prefixed_state,
    unprefixed_state,
)

__all__ = ["family_for", "FrozenProbe", "ProbeModel"]


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
        return prefixed_state(
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

        arrays = unprefixed_state(tensors, self.state_prefix)
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


def family_for(strategy: str) -> FrozenProbe:
    """The family object of ``strategy`` (its line in ``scdlkit._shared.strategies``)."""
    del strategy  # one object serves the family
    return FrozenProbe()
