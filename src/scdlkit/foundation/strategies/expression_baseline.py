"""``baseline``: logistic regression on log-normalised expression; reads no foundation model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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

__all__ = ["family_for", "ExpressionBaseline"]


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
        return prefixed_state(model.state_arrays(), self.state_prefix)

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

        arrays = unprefixed_state(tensors, self.state_prefix)
        return ExpressionLogisticBaseline.from_state(arrays, manifest["baseline_genes"])


def family_for(strategy: str) -> ExpressionBaseline:
    """The family object of ``strategy`` (its line in ``scdlkit._shared.strategies``)."""
    del strategy  # one object serves the family
    return ExpressionBaseline()
