"""The annotation runner's arguments: checked on construction, recorded once as JSON."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scdlkit._shared.strategies import STRATEGIES
from scdlkit.foundation._checkpoint import ScGPTCheckpoint
from scdlkit.foundation.peft import resolve_strategy_config

__all__ = ["check_strategies", "recorded_arguments", "str_list"]


def check_strategies(
    strategies: Sequence[str],
    strategy_configs: Mapping[str, Any] | None,
    lora_config: Any,
) -> tuple[tuple[str, ...], dict[str, Any]]:
    if isinstance(strategies, str):
        strategies = (strategies,)
    strategies = tuple(strategies)
    if not strategies:
        msg = f"strategies is empty; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        msg = f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    if len(set(strategies)) != len(strategies):
        msg = f"strategies lists a strategy twice: {strategies}."
        raise ValueError(msg)
    if strategy_configs is not None and lora_config is not None:
        msg = (
            "pass either strategy_configs= or the legacy lora_config=, not both "
            "(use strategy_configs={'lora': ...})."
        )
        raise ValueError(msg)
    configs = dict(strategy_configs or {})
    if lora_config is not None:
        configs = {"lora": lora_config}
    for name in configs:
        if name not in strategies:
            msg = (
                f"a config was given for strategy {name!r}, which is not in strategies="
                f"{strategies}; add it to strategies or drop its config."
            )
            raise ValueError(msg)
    return strategies, {
        name: resolve_strategy_config(name, config) for name, config in configs.items()
    }


def recorded_arguments(arguments: dict[str, Any], configs: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor's arguments as JSON-ready values, recorded once (``init_params_``).

    The legacy ``lora_config`` is folded into ``strategy_configs``; paths are absolute, so the
    record means the same from any working directory.
    """
    recorded = dict(arguments)
    del recorded["lora_config"]
    checkpoint = recorded["checkpoint"]
    if isinstance(checkpoint, ScGPTCheckpoint):
        checkpoint = checkpoint.path
    if isinstance(checkpoint, os.PathLike) or Path(checkpoint).is_dir():
        checkpoint = str(Path(checkpoint).resolve())
    output_dir = recorded["output_dir"]
    strategies = recorded["strategies"]
    recorded.update(
        checkpoint=checkpoint,
        strategies=[strategies] if isinstance(strategies, str) else list(strategies),
        strategy_configs={name: config.to_dict() for name, config in configs.items()},
        output_dir=None if output_dir is None else str(Path(output_dir).resolve()),
        device=str(recorded["device"]),
        training=dict(recorded["training"] or {}),
        test_batches=str_list(recorded["test_batches"]),
        val_batches=str_list(recorded["val_batches"]),
    )
    return recorded


def str_list(values: Sequence[Any] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]
