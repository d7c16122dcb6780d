"""The registry of adaptation methods: strategy name -> config class and apply function.

Modelled on peft's ``register_peft_method``: each method's file registers itself once, and
everything that dispatches on a method (building a model, resolving a user's config) asks here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scdlkit._shared.strategies import PEFT_STRATEGIES
from scdlkit.foundation.models._contract import FoundationEncoder
from scdlkit.foundation.peft._base import PEFTConfig

__all__ = [
    "PEFTMethod",
    "PEFT_METHODS",
    "apply_peft",
    "register_peft_method",
    "resolve_strategy_config",
]


@dataclass(frozen=True)
class PEFTMethod:
    """One adaptation method: its strategy name, config class and apply function.

    Attributes
    ----------
    name
        The ``tuning_strategy`` name (one of ``scdlkit._shared.strategies.PEFT_STRATEGIES``).
    config_cls
        Its :class:`~scdlkit.foundation.peft.PEFTConfig` subclass.
    apply
        ``apply(encoder, config) -> encoder``, changing the encoder in place.
    """

    name: str
    config_cls: type[PEFTConfig]
    apply: Callable[[FoundationEncoder, Any], FoundationEncoder]


#: ``tuning_strategy`` -> :class:`PEFTMethod`, in the order of ``PEFT_STRATEGIES``.
PEFT_METHODS: dict[str, PEFTMethod] = {}


def register_peft_method(
    *,
    name: str,
    config_cls: type[PEFTConfig],
    apply: Callable[[FoundationEncoder, Any], FoundationEncoder],
) -> PEFTMethod:
    """Make an adaptation method known to :func:`apply_peft` and :func:`resolve_strategy_config`.

    Parameters
    ----------
    name
        Its strategy name; must be one of the PEFT strategy names of
        ``scdlkit._shared.strategies`` (the one place strategy names are spelled out) and equal
        ``config_cls.strategy``.
    config_cls
        Its config class.
    apply
        Its apply function.

    Returns
    -------
    The registered method.

    Raises
    ------
    ValueError
        For an unknown name, a name registered twice, or a config class of another strategy.

    Examples
    --------
    >>> from scdlkit.foundation.peft import PEFT_METHODS
    >>> PEFT_METHODS["lora"].config_cls.__name__
    'LoRAConfig'
    """
    if name not in PEFT_STRATEGIES:
        msg = (
            f"cannot register PEFT method {name!r}: not one of the PEFT strategy names "
            f"{', '.join(map(repr, PEFT_STRATEGIES))} (scdlkit._shared.strategies)."
        )
        raise ValueError(msg)
    if not (isinstance(config_cls, type) and issubclass(config_cls, PEFTConfig)):
        msg = f"config_cls of {name!r} must be a PEFTConfig subclass, got {config_cls!r}."
        raise ValueError(msg)
    if config_cls.strategy != name:
        msg = (
            f"{config_cls.__name__}.strategy is {config_cls.strategy!r}, so it cannot be "
            f"registered as {name!r}."
        )
        raise ValueError(msg)
    if name in PEFT_METHODS:
        msg = f"PEFT method {name!r} is already registered."
        raise ValueError(msg)
    method = PEFTMethod(name=name, config_cls=config_cls, apply=apply)
    # keep the display order of PEFT_STRATEGIES whatever order the method files are imported in
    ordered = sorted(
        {**PEFT_METHODS, name: method}.items(), key=lambda kv: PEFT_STRATEGIES.index(kv[0])
    )
    PEFT_METHODS.clear()
    PEFT_METHODS.update(ordered)
    return method


def apply_peft(encoder: FoundationEncoder, config: PEFTConfig) -> FoundationEncoder:
    """Apply the method ``config`` describes (dispatch on its type) to ``encoder``, in place.

    Parameters
    ----------
    encoder
        The scGPT encoder.
    config
        A :class:`LoRAConfig`, :class:`AdapterConfig`, :class:`PrefixTuningConfig` or
        :class:`IA3Config`.

    Returns
    -------
    The same encoder.

    Examples
    --------
    >>> from scdlkit.foundation.peft import IA3Config, apply_peft
    >>> apply_peft(encoder, IA3Config())  # doctest: +SKIP
    """
    method = PEFT_METHODS.get(type(config).strategy)
    if method is None or type(config) is not method.config_cls:
        msg = (
            f"no adaptation method for {type(config).__name__}; expected one of "
            f"{', '.join(m.config_cls.__name__ for m in PEFT_METHODS.values())}."
        )
        raise ValueError(msg)
    return method.apply(encoder, config)


def resolve_strategy_config(
    strategy: str, config: PEFTConfig | dict[str, Any] | None
) -> PEFTConfig | None:
    """The validated config of ``strategy``: defaults for ``None``, a dict through ``from_dict``.

    Parameters
    ----------
    strategy
        A ``tuning_strategy`` name (``"head"``, ``"full_finetune"``, ``"lora"``, ``"adapter"``,
        ``"prefix_tuning"``, ``"ia3"``). Names are not otherwise checked here.
    config
        ``None``, a config object or a plain dict.

    Returns
    -------
    The config, or ``None`` for strategies that take none (``head``, ``full_finetune``).

    Raises
    ------
    ValueError
        When the config's type does not belong to ``strategy``, or a strategy without a config is
        given one.

    Examples
    --------
    >>> from scdlkit.foundation.peft import resolve_strategy_config
    >>> resolve_strategy_config("lora", {"rank": 4}).rank
    4
    """
    method = PEFT_METHODS.get(strategy)
    if method is None:
        if config is not None and config != {}:
            msg = (
                f"tuning_strategy={strategy!r} takes no strategy_config (got {config!r}); configs "
                "belong to "
                + ", ".join(f"{k!r} ({m.config_cls.__name__})" for k, m in PEFT_METHODS.items())
                + "."
            )
            raise ValueError(msg)
        return None
    config_type = method.config_cls
    if config is None:
        return config_type()
    if isinstance(config, dict):
        return config_type.from_dict(config)
    if not isinstance(config, config_type):
        msg = (
            f"tuning_strategy={strategy!r} needs a {config_type.__name__} (or a dict of its "
            f"fields), got {type(config).__name__}."
        )
        raise ValueError(msg)
    return config
