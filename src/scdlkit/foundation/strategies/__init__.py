"""The strategy table: every strategy name and the family that fits, predicts and saves it.

One family object per file (:mod:`.frozen_probe`, :mod:`.expression_baseline`, :mod:`.neural`),
built on the contract in :mod:`scdlkit.foundation._fitting`. Everything outside reads a strategy
through :func:`strategy_family` and the family's flags, never by its name. A new family is one
file here (with a ``family_for(strategy)`` function) plus its line in
:data:`scdlkit._shared.strategies.STRATEGY_KINDS`, the one place a strategy is registered.
"""

from __future__ import annotations

from importlib import import_module

from scdlkit._shared.strategies import STRATEGIES, STRATEGY_KINDS
from scdlkit.foundation._fitting import StrategyFamily

__all__ = ["STRATEGY_TABLE", "register_strategy", "strategy_family"]

#: A PEFT strategy is fitted by the neural family (its method is in ``foundation/peft/``).
_FAMILY_FILE = {"peft": "neural"}


def _family(name: str, kind: str) -> StrategyFamily:
    module = import_module(f"{__name__}.{_FAMILY_FILE.get(kind, kind)}")
    return module.family_for(name)


#: Strategy name -> its family, in display order (built from ``STRATEGY_KINDS``).
STRATEGY_TABLE: dict[str, StrategyFamily] = {
    name: _family(name, kind) for name, kind in STRATEGY_KINDS.items()
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
