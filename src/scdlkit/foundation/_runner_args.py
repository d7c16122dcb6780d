"""The annotation runner's arguments: checked before any work, recorded once as JSON.

:data:`RUNNER_ARGUMENTS` gives every constructor argument its check (type, range, choices);
:func:`check_runner_arguments` runs them, then the rules that join several arguments. The tables
of the runner's methods are beside it. The property-based tests generate accepted and refused
values from these tables, so an argument added without a check fails a test.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from scdlkit._shared.arguments import (
    check_bool,
    check_choice,
    check_int,
    check_optional_int,
    check_optional_number,
)
from scdlkit._shared.strategies import STRATEGIES
from scdlkit.foundation._device import PRECISIONS
from scdlkit.foundation._final_model import KEEP_CHOICES, REFIT_CHOICES
from scdlkit.foundation._training_settings import SETTING_CHECKS, check_training_overrides
from scdlkit.foundation.models import is_model_checkpoint
from scdlkit.foundation.models._contract import ModelCheckpoint
from scdlkit.foundation.peft import PEFTConfig, resolve_strategy_config
from scdlkit.training._checks import (
    FRACTION,
    MAX_SEED,
    SEED,
    Check,
    check_adata,
    check_arguments,
    check_device,
    check_optional_path,
    check_optional_text,
    check_path,
    check_text,
    optional,
)

__all__ = [
    "ANNOTATE_ARGUMENTS",
    "LOAD_ARGUMENTS",
    "PREDICT_ARGUMENTS",
    "RUNNER_ARGUMENTS",
    "SHORTCUTS",
    "check_rows",
    "check_runner_arguments",
    "check_strategies",
    "check_validation_cells",
    "recorded_arguments",
]

#: The runner's shortcuts for training settings of every neural strategy.
SHORTCUTS = ("epochs", "lr", "early_stopping_patience", "class_weight")


def check_checkpoint(name: str, value: Any) -> str | os.PathLike | ModelCheckpoint:
    """An official checkpoint name, a folder, or a resolved checkpoint (found by ``fit``)."""
    if is_model_checkpoint(value):
        return value
    return check_path(name, value)


def check_strategy_names(name: str, value: Any) -> tuple[str, ...]:
    """Known, distinct strategy names; one name alone is a one-strategy tuple."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence):  # not a set: the order is part of the result
        msg = f"{name} must be strategy names such as ('frozen_probe', 'head'), got {value!r}."
        raise TypeError(msg)
    strategies = tuple(value)
    if not strategies:
        msg = f"{name} is empty; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    unknown = [s for s in strategies if not isinstance(s, str) or s not in STRATEGIES]
    if unknown:
        msg = f"unknown strategy {unknown[0]!r} in {name}; choose from {', '.join(STRATEGIES)}."
        raise ValueError(msg)
    if len(set(strategies)) != len(strategies):
        msg = f"{name} lists a strategy twice: {strategies}."
        raise ValueError(msg)
    return strategies


def check_config(name: str, value: Any) -> PEFTConfig | dict[str, Any] | None:
    """A strategy config: ``None``, a config object or a dict of its fields (checked against
    its strategy by :func:`check_strategies`)."""
    if value is None or isinstance(value, PEFTConfig):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    msg = f"{name} must be a config such as LoRAConfig(...) or a dict of its fields, got {value!r}."
    raise TypeError(msg)


def check_strategy_configs(name: str, value: Any) -> dict[str, Any] | None:
    """``None`` or ``{strategy name: config}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        msg = f"{name} must be None or a dict {{strategy: config}}, got {type(value).__name__}."
        raise TypeError(msg)
    return {
        check_text(f"a key of {name}", k): check_config(f"{name}[{k!r}]", v)
        for k, v in value.items()
    }


def check_batch_names(name: str, value: Any) -> list[str] | None:
    """``None``, one batch name, or a sequence of them (strings or integers, as in ``obs``)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence | np.ndarray):  # not a set: the order is recorded
        msg = f"{name} must be None or a list of batch names, got {value!r}."
        raise TypeError(msg)
    names = list(value)
    for item in names:
        if isinstance(item, bool) or not isinstance(item, str | numbers.Integral):
            msg = f"{name} must hold batch names (strings or integers), got {item!r}."
            raise TypeError(msg)
    return [str(item) for item in names]


#: Every argument of :class:`~scdlkit.foundation.ScGPTAnnotationRunner`.
RUNNER_ARGUMENTS: dict[str, Check] = {
    "label_key": check_text,
    "checkpoint": check_checkpoint,
    "strategies": check_strategy_names,
    "strategy_configs": check_strategy_configs,
    "lora_config": check_config,
    "batch_size": partial(check_int, min_value=1),
    "val_size": FRACTION,
    "test_size": FRACTION,
    "random_state": SEED,
    "device": check_device,
    "output_dir": check_optional_path,
    "overwrite": check_bool,
    "gene_key": check_optional_text,
    "layer": check_optional_text,
    "training": check_training_overrides,
    **{name: optional(SETTING_CHECKS[name]) for name in SHORTCUTS},
    "precision": partial(check_choice, choices=PRECISIONS),
    "confidence_threshold": partial(check_optional_number, min_value=0, max_value=1),
    "attention_dropout": optional(FRACTION),
    "batch_key": check_optional_text,
    "split_by": partial(check_choice, choices=("cells", "batch")),
    "test_batches": check_batch_names,
    "val_batches": check_batch_names,
    # every repeat has its own seed: at most as many repeats as there are seeds
    "n_repeats": partial(check_int, min_value=1, max_value=MAX_SEED + 1),
    "calibration_size": FRACTION,
    "calibration_batches": check_batch_names,
    "refit": partial(check_choice, choices=REFIT_CHOICES),
    "keep": partial(check_choice, choices=KEEP_CHOICES),
    "progress": check_bool,
}


def check_predictions(name: str, value: Any) -> Mapping[str, Any] | None:
    """``None`` or the output of ``predict``: labels, probabilities and latent."""
    if value is None:
        return None
    missing = (
        sorted({"label_codes", "labels", "probabilities", "latent"} - set(value))
        if isinstance(value, Mapping)
        else None
    )
    if missing is None:
        msg = f"{name} must be None or the dict that predict() returns, got {type(value).__name__}."
        raise TypeError(msg)
    if missing:
        msg = f"{name} lacks {missing}; pass the dict that predict(adata) returns, or None."
        raise ValueError(msg)
    return value


#: ``predict``'s arguments.
PREDICT_ARGUMENTS: dict[str, Check] = {
    "adata": check_adata,
    "gene_key": check_optional_text,
    "layer": check_optional_text,
    "chunk_size": partial(check_optional_int, min_value=1),
    "strategy": optional(partial(check_choice, choices=STRATEGIES)),
}
#: ``annotate_adata``'s arguments.
ANNOTATE_ARGUMENTS: dict[str, Check] = {
    "adata": check_adata,
    "obs_key": check_text,
    "embedding_key": check_text,
    "predictions": check_predictions,
}
#: ``load``'s arguments.
LOAD_ARGUMENTS: dict[str, Check] = {
    "path": check_path,
    "checkpoint": optional(check_checkpoint),
    "device": check_device,
    "verify_checkpoint": check_bool,
}


def check_runner_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor's arguments, each checked and canonical, then checked together.

    ``strategies`` becomes a tuple and ``strategy_configs`` the resolved configs (``lora_config``
    folded in); nothing is read, loaded or computed.
    """
    checked = check_arguments(RUNNER_ARGUMENTS, arguments)
    checked["strategies"], checked["strategy_configs"] = check_strategies(
        checked["strategies"], checked["strategy_configs"], checked.pop("lora_config")
    )
    held_out = checked["val_size"] + checked["test_size"] + checked["calibration_size"]
    if held_out >= 1:
        msg = (
            f"val_size + test_size + calibration_size = {held_out} leaves no cells for "
            "training; lower them."
        )
        raise ValueError(msg)
    if checked["calibration_batches"] is not None and checked["batch_key"] is None:
        msg = "calibration_batches= needs batch_key= naming the adata.obs column of batches."
        raise ValueError(msg)
    if checked["split_by"] == "batch" and checked["batch_key"] is None:
        msg = "split_by='batch' needs batch_key= naming the adata.obs column of batches."
        raise ValueError(msg)
    last_seed = checked["random_state"] + checked["n_repeats"] - 1
    if last_seed > MAX_SEED:
        msg = (
            f"random_state={checked['random_state']} with n_repeats={checked['n_repeats']} seeds "
            f"repeats up to {last_seed}, beyond the largest seed {MAX_SEED}; lower random_state."
        )
        raise ValueError(msg)
    return checked


def check_validation_cells(
    strategies: Sequence[str], val_size: float, split_by: str, val_batches: list[str] | None
) -> None:
    """Several strategies are ranked on validation cells: refuse a split that holds none (``fit``
    asks before any work; a split can still come out empty on data with tiny classes)."""
    by_batch = split_by == "batch" and val_batches is not None
    if len(strategies) > 1 and (val_batches == [] if by_batch else val_size == 0):
        what = "val_batches=[]" if by_batch else f"val_size={val_size}"
        msg = (
            f"no validation cells ({what}) to rank {len(strategies)} strategies on: give "
            "val_size > 0 (or val_batches= with split_by='batch'), or fit one strategy at a time."
        )
        raise ValueError(msg)


def check_strategies(
    strategies: tuple[str, ...],
    strategy_configs: Mapping[str, Any] | None,
    lora_config: Any,
) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The strategies and the resolved config of each one given one."""
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
    resolved = {name: resolve_strategy_config(name, config) for name, config in configs.items()}
    return strategies, {name: config for name, config in resolved.items() if config is not None}


def recorded_arguments(checked: Mapping[str, Any]) -> dict[str, Any]:
    """The checked constructor arguments as JSON-ready values, recorded once (``init_params_``).

    The legacy ``lora_config`` is already folded into ``strategy_configs``; paths are absolute,
    so the record means the same from any working directory.
    """
    recorded = dict(checked)
    checkpoint = recorded["checkpoint"]
    if is_model_checkpoint(checkpoint):
        checkpoint = checkpoint.path
    if isinstance(checkpoint, os.PathLike) or Path(checkpoint).is_dir():
        checkpoint = str(Path(checkpoint).resolve())
    output_dir = recorded["output_dir"]
    recorded.update(
        checkpoint=checkpoint,
        strategies=list(recorded["strategies"]),
        strategy_configs={name: c.to_dict() for name, c in recorded["strategy_configs"].items()},
        output_dir=None if output_dir is None else str(Path(output_dir).resolve()),
        device=str(recorded["device"]),
    )
    return recorded


def check_rows(predictions: Mapping[str, Any], n_obs: int) -> None:
    """Every array of ``predictions`` has one row per cell of the AnnData it is written to."""
    for key in ("label_codes", "labels", "probabilities", "latent"):
        rows = len(predictions[key])
        if rows != n_obs:
            msg = (
                f"predictions[{key!r}] has {rows} rows for an AnnData of {n_obs} cells; pass "
                "predict(adata) of this AnnData, or predictions=None."
            )
            raise ValueError(msg)


def check_recipe_for_model(training: Any, card: Any) -> None:
    """``training="upstream"`` only for a model whose published recipes it reproduces."""
    if (training or {}).get("recipe") == "upstream" and not card.upstream_recipe:
        msg = (
            f"training='upstream' names scGPT's and scPEFT's published recipes; {card.title}'s "
            "own fine-tuning recipe is not wired into scdlkit yet. Use the default recipe "
            "(training=None) or give its settings explicitly (lr, weight_decay, ...)."
        )
        raise ValueError(msg)
