"""The strategy table: every strategy name and the family that fits, predicts and saves it.

One family object per file (:mod:`.frozen_probe`, :mod:`.expression_baseline`, :mod:`.neural`),
built on the contract in :mod:`scdlkit.foundation._fitting`. Everything outside reads a strategy
through :func:`strategy_family` and the family's flags, never by its name. A new family is one
file here plus its line in :data:`STRATEGY_TABLE` (and its name in
:mod:`scdlkit._shared.strategies`).
"""

from __future__ import annotations

from scdlkit._shared.strategies import NEURAL_STRATEGIES, STRATEGIES
from scdlkit.foundation._fitting import StrategyFamily
from scdlkit.foundation.strategies.expression_baseline import ExpressionBaseline
from scdlkit.foundation.strategies.frozen_probe import FrozenProbe
from scdlkit.foundation.strategies.neural import NeuralStrategy

__all__ = ["STRATEGY_TABLE", "register_strategy", "strategy_family"]

#: Strategy name -> its family, in display order.
STRATEGY_TABLE: dict[str, StrategyFamily] = {
    "frozen_probe": FrozenProbe(),
    **{name: NeuralStrategy(name) for name in NEURAL_STRATEGIES},
    "baseline": ExpressionBaseline(),
}


def register_strategy(name: str, family: StrategyFamily) -> None:
    """Make ``family`` the one that fits, predicts and saves strategy ``name``."""
    if name not in STRATEGIES:
        msg = f"{name!r} is not a strategy name of scdlkit._shared.strategies.STRATEGIES."
        raise ValueError(msg)
    STRATEGY_TABLE[name] = family


def strategy_family(name: str) -> StrategyFamily:
    """The family registered for strategy ``name``."""
    try:
        return STRATEGY_TABLE[name]
    except KeyError:
        msg = f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg) from None
