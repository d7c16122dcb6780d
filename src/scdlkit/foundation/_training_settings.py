"""The training settings of each neural strategy: defaults and how overrides apply.

Two recipes. scdlkit's defaults (:data:`DEFAULT_TRAINING`): each rate chosen on validation cells
over 5 seeds at the 300-step budget by ``benchmarks/tune_defaults.py`` where that tuning ran,
else the published value (docs/strategies.md names the source of every setting): full
fine-tuning with upstream scGPT's Adam (eps 1e-4) at 1e-3, StepLR gamma 0.9 per epoch, gradient
clipping at 1.0; parameter-efficient methods at 3e-3; encoder dropout off while training (a
cost choice); the frozen ``head`` trains only the classifier on ``<cls>`` features computed once,
so it affords many cheap epochs. Every neural strategy keeps the epoch with the lowest loss on
an inner split of the training cells and stops after ``early_stopping_patience`` epochs without
improvement. ``training="upstream"`` (:data:`UPSTREAM_TRAINING`) trains with the published
recipes instead.

Budgets hold at any dataset size (:func:`step_budget`): an encoder-trained strategy may take up
to ``min_steps`` optimiser steps on small data and at most ``max_steps`` on large data. On a small
dataset (few batches per epoch) its epochs are stretched to reach the floor, and early stopping
then waits at most about ``max_patience_steps`` steps without improvement (rounded up to whole
epochs, never fewer than the recipe's patience), so a run that has stopped learning ends early.
On a large dataset the run ends at the cap, and the validation data is evaluated every
``eval_every`` steps instead of once per (long) epoch. The learning-rate decay and the patience
count evaluation periods and are rescaled to them, so the schedule over the run stays the
recipe's. An explicit ``epochs`` (without ``min_steps`` or ``max_steps``) means exactly that many
epochs.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Collection, Mapping
from functools import partial
from typing import Any

from scdlkit._shared.arguments import check_choice, check_int
from scdlkit._shared.strategies import (
    NEURAL_STRATEGIES,
    PEFT_STRATEGIES,
    STRATEGIES,
)
from scdlkit.foundation._annotation_model import DEFAULT_CLASSIFIER_DROPOUT
from scdlkit.foundation._input_norm import DEFAULT_INPUT_NORM, INPUT_NORMS
from scdlkit.training._checks import FRACTION, TRAINING_SETTINGS, Check, optional

__all__ = [
    "DEFAULT_TRAINING",
    "EVAL_EVERY",
    "MAX_PATIENCE_STEPS",
    "MAX_STEPS",
    "MIN_STEPS",
    "RECIPES",
    "SETTING_CHECKS",
    "STRATEGIES",
    "STRETCH_WARNING_EPOCHS",
    "TRAINING_KEYS",
    "UPSTREAM_TRAINING",
    "check_training_overrides",
    "resolve_training",
    "step_budget",
    "warn_if_stretched",
]


#: Optimiser steps an encoder-trained strategy may take on small data (its epochs are stretched
#: to reach them; early stopping ends the run sooner): about the scGPT annotation tutorial's
#: budget (10 epochs of 7,060 cells at batch 32). With :data:`MAX_PATIENCE_STEPS` it was chosen
#: against the earlier 300 on validation cells over 5 seeds (docs/tuning.md, "step budget"):
#: ahead for lora on the planted data, level on pbmc68k, at 1.0-1.2x the time there. The rates
#: were tuned at the 300-step budget (benchmarks/tune_defaults.py)
MIN_STEPS = 2000
#: When the floor stretches a run, early stopping waits at most about this many optimiser steps
#: without improvement on the inner split (rounded up to whole epochs, never fewer than the
#: recipe's ``early_stopping_patience``): a cost choice, about the wait the 300-step budget had
#: on 600-700 cells (13-18 epochs of 5-7 steps). 200 bought nothing on the planted data; the
#: uncapped wait (3 of the stretched run's 10 "recipe epochs", 600 steps at 2,000) costs
#: 1.8-3.7x the capped one per fit on small data (4.7-9x the 300-step floor; docs/tuning.md)
MAX_PATIENCE_STEPS = 100
#: Optimiser steps an encoder-trained strategy takes at most: a cost cap, not measured at
#: whole-human size (10x the floor; 1.28M cells seen at batch 64). It binds above ~250,000 cells,
#: where 10 epochs would take more steps (1M cells: about 79,700; docs/performance.md has the table)
MAX_STEPS = 20_000
#: An epoch of more optimiser steps than this is evaluated every this many steps instead (early
#: stopping, best weights, lr decay): a run at the cap is evaluated 10 times, as the recipe's 10
#: epochs are. Smaller epochs (up to ~250,000 cells at batch 64) are evaluated once each
EVAL_EVERY = MAX_STEPS // 10
#: A floor that stretches training past this many epochs is reported (a UserWarning, once per
#: fit and strategy): every cell is then seen more times than the recipe ever shows it
STRETCH_WARNING_EPOCHS = 50
_COMMON = {
    "head_lr": None,  # None: the head trains at `lr`
    "weight_decay": 0.0,
    "warmup": 0.0,
    "grad_clip": 1.0,
    "monitor": "val_loss",
    "class_weight": None,
    "optimizer": "adamw",
    "adam_eps": 1e-8,
    "eval_every": EVAL_EVERY,
    # how the <cls> vector is normalised before the classifier (a model setting, not the
    # Trainer's; foundation/_input_norm.py): chosen by benchmarks/tune_defaults.py
    "input_norm": DEFAULT_INPUT_NORM,
    # dropout on the normalised <cls> vector before the head (a model setting)
    "classifier_dropout": DEFAULT_CLASSIFIER_DROPOUT,
}
#: Settings of the strategies that train the encoder (or modules inside it), not of ``head``.
_ENCODER = {
    # dropout inside the encoder while it trains; None keeps the checkpoint's (upstream's 0.2).
    # 0, a cost choice (not tuned): a CPU has no fused attention kernel with dropout, so each
    # attention call takes a path several times slower (docs/strategies.md)
    "encoder_dropout": 0.0,
    "max_patience_steps": MAX_PATIENCE_STEPS,
}
_PEFT = {
    **_ENCODER,
    "epochs": 10,
    "min_steps": MIN_STEPS,
    "max_steps": MAX_STEPS,
    # docs/tuning.md: tuned on validation cells of the planted data and pbmc, 5 seeds each:
    # ahead of the LoRA paper's 5e-4 (lora) and scPEFT's 5e-5 (adapter, prefix_tuning) on
    # both; the IA3 paper's rate for ia3, kept on pbmc (1e-3 not ahead)
    "lr": 3e-3,
    "lr_decay": 0.9,
    "early_stopping_patience": 3,
}
#: Training settings per neural strategy (``batch_size`` comes from the runner).
DEFAULT_TRAINING: dict[str, dict[str, Any]] = {
    "head": {
        **_COMMON,
        "epochs": 50,
        "min_steps": 0,
        # trains on cached features: 50 epochs cost little next to computing them
        "max_steps": None,
        "lr": 1e-3,
        "lr_decay": None,
        "early_stopping_patience": 10,
    },
    "full_finetune": {
        **_COMMON,
        **_ENCODER,
        "epochs": 10,
        "min_steps": MIN_STEPS,
        "max_steps": MAX_STEPS,
        # tuned: ahead of the scGPT tutorial's 1e-4 on the planted and pbmc data at 300 steps
        # (docs/strategies.md); the new head trains at the same rate
        "lr": 1e-3,
        "lr_decay": 0.9,
        "early_stopping_patience": 3,
        # upstream scGPT's optimiser: Adam with eps 1e-4 under mixed precision (docs/strategies.md)
        "optimizer": "adam",
        "adam_eps": 1e-4,
    },
    **{name: {**_COMMON, **_PEFT} for name in PEFT_STRATEGIES},
}
#: What ``training=`` may name as its recipe: ``"scdlkit"`` (:data:`DEFAULT_TRAINING`) or
#: ``"upstream"`` (:data:`UPSTREAM_TRAINING`).
RECIPES = ("scdlkit", "upstream")
_UPSTREAM = {
    **_COMMON,
    "input_norm": "none",  # upstream's head reads the raw <cls> vector, without dropout
    "classifier_dropout": 0.0,
    "encoder_dropout": None,  # the checkpoint's (0.2)
    "min_steps": 0,
    "max_steps": None,
    "optimizer": "adam",
    "adam_eps": 1e-4,
    "lr_decay": 0.9,
}
#: The published recipes, setting by setting (``training="upstream"``): scGPT's annotation
#: tutorial for ``full_finetune`` (no early stopping: the best epoch is kept), scPEFT's
#: identification tutorial for ``lora``, ``adapter`` and ``prefix_tuning`` (patience 15), the
#: IA3 paper (T-Few: Adafactor at 3e-3, 1,000 steps of batch 8, 6 % warm-up) for ``ia3``;
#: ``head`` has no published recipe and keeps scdlkit's, on the raw ``<cls>`` vector.
#: docs/strategies.md lists what no setting reproduces (tokens, the ``<cls>`` value, scPEFT's
#: class weighting and sampler, its adapted layers, T-Few's linear decay).
UPSTREAM_TRAINING: dict[str, dict[str, Any]] = {
    "head": {**DEFAULT_TRAINING["head"], "input_norm": "none", "classifier_dropout": 0.0},
    "full_finetune": {
        **_UPSTREAM,
        "epochs": 10,
        "lr": 1e-4,
        "early_stopping_patience": None,
        "batch_size": 32,
    },
    **{
        name: {
            **_UPSTREAM,
            "epochs": 20,
            "lr": 5e-5,
            "early_stopping_patience": 15,
            "batch_size": 50,
        }
        for name in PEFT_STRATEGIES
        if name != "ia3"  # scPEFT has no IA3
    },
    "ia3": {
        **_UPSTREAM,
        "optimizer": "adafactor",
        "lr": 3e-3,
        "lr_decay": None,
        "warmup": 0.06,
        "epochs": 1,
        "min_steps": 1000,
        "max_steps": 1000,
        "early_stopping_patience": None,
        "batch_size": 8,
    },
}
TRAINING_KEYS = frozenset().union(*DEFAULT_TRAINING.values(), *UPSTREAM_TRAINING.values())
#: The check of every training setting: the Trainer's, plus the settings only the runner reads.
SETTING_CHECKS: dict[str, Check] = {
    **TRAINING_SETTINGS,
    "min_steps": partial(check_int, min_value=0),
    "max_patience_steps": optional(partial(check_int, min_value=1)),
    "encoder_dropout": optional(FRACTION),
    "input_norm": partial(check_choice, choices=INPUT_NORMS),
    "classifier_dropout": FRACTION,
    # the recipe's batch size for training (the runner's batch_size where not set)
    "batch_size": partial(check_int, min_value=1),
}
#: Strategies fitted in closed form (no epochs, no learning rate) take class weighting only.
FIT_SETTINGS: dict[str, dict[str, Any]] = {
    name: {"class_weight": None} for name in STRATEGIES if name not in NEURAL_STRATEGIES
}


def _defaults(strategy: str, recipe: str = "scdlkit") -> dict[str, Any]:
    table = UPSTREAM_TRAINING if recipe == "upstream" else DEFAULT_TRAINING
    return dict(table.get(strategy) or FIT_SETTINGS[strategy])


def _allowed(strategy: str) -> set[str]:
    """The settings ``strategy`` takes under any recipe (closed-form fits: class_weight)."""
    if strategy not in NEURAL_STRATEGIES:
        return set(FIT_SETTINGS[strategy])
    return set(DEFAULT_TRAINING[strategy]) | set(UPSTREAM_TRAINING[strategy])


def resolve_training(
    strategy: str, overrides: Mapping[str, Any] | None, shortcuts: Mapping[str, Any]
) -> dict[str, Any]:
    """Settings for ``strategy``: defaults, then global overrides, then per-strategy ones.

    ``overrides`` may hold setting names (apply to every strategy) and strategy names mapping to
    dicts of settings; ``shortcuts`` are the runner's own arguments (``epochs=``, ``lr=``, ...)
    where not ``None``.
    """
    overrides = dict(overrides or {})
    settings = _defaults(strategy, overrides.pop("recipe", "scdlkit"))
    known = _allowed(strategy)
    settings.update({k: v for k, v in shortcuts.items() if v is not None and k in known})
    settings.update({k: v for k, v in overrides.items() if k in TRAINING_KEYS and k in known})
    settings.update(overrides.get(strategy, {}))
    explicit = {k for k, v in shortcuts.items() if v is not None} | set(overrides)
    explicit |= set(overrides.get(strategy, {}))
    if "epochs" in explicit:  # an explicit epochs means exactly that many epochs
        if "min_steps" not in explicit and "min_steps" in settings:
            settings["min_steps"] = 0
        if "max_steps" not in explicit and "max_steps" in settings:
            settings["max_steps"] = None
    return settings


def step_budget(settings: Mapping[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """The Trainer's settings for epochs of ``steps_per_epoch`` optimiser steps.

    The recipe's ``epochs`` give ``epochs * steps_per_epoch`` steps; those are raised to
    ``min_steps`` (whole epochs: stretched) and cut to ``max_steps`` (the Trainer's own
    ``max_steps``). Evaluation periods are epochs, or ``eval_every`` steps when an epoch holds
    more; the per-period lr decay and the patience (in periods) are rescaled so that the run
    decays the rate as much as the recipe's epochs do and waits the same share of the run. When
    the floor stretched the run, the wait is at most ``max_patience_steps`` steps, rounded up to
    whole periods, and never fewer periods than the recipe's patience.

    Parameters
    ----------
    settings
        Resolved settings of one strategy (:func:`resolve_training`).
    steps_per_epoch
        Optimiser steps in one epoch (batches of the cells trained on).

    Returns
    -------
    dict
        The settings without ``min_steps`` and ``max_patience_steps``; ``epochs``,
        ``max_steps``, ``lr_decay`` and ``early_stopping_patience`` as the Trainer takes them.

    Examples
    --------
    >>> settings = resolve_training("lora", None, {})
    >>> budget = step_budget(settings, steps_per_epoch=6)  # 357 cells at batch 64
    >>> budget["epochs"], budget["early_stopping_patience"], round(budget["lr_decay"], 4)
    (334, 17, 0.9969)
    >>> budget = step_budget(settings, steps_per_epoch=7969)  # 1M cells
    >>> budget["epochs"], budget["max_steps"], budget["early_stopping_patience"]
    (3, 20000, 3)
    """
    out = dict(settings)
    min_steps = int(out.pop("min_steps", 0) or 0)
    max_patience_steps = out.pop("max_patience_steps", None)
    cap = out.get("max_steps")
    every = out.get("eval_every")
    per_epoch = max(int(steps_per_epoch), 1)
    recipe = int(out["epochs"])
    steps = max(recipe * per_epoch, min_steps)
    stretched = steps > recipe * per_epoch
    epochs = -(-steps // per_epoch)  # the floor stretches to whole epochs
    if cap is not None and epochs * per_epoch > cap:
        out["max_steps"], steps = int(cap), int(cap)
    else:
        out["max_steps"], steps = None, epochs * per_epoch
    out["epochs"] = -(-steps // per_epoch)
    period = every if every is not None and per_epoch > every else per_epoch
    factor = -(-steps // period) / recipe  # evaluation periods per recipe epoch
    if factor == 1:
        return out
    if out.get("lr_decay") is not None:
        out["lr_decay"] = float(out["lr_decay"]) ** (1 / factor)
    patience = out.get("early_stopping_patience")
    if patience is not None:
        rescaled = math.ceil(patience * factor)
        if stretched and max_patience_steps is not None:  # periods of about that many steps
            rescaled = min(rescaled, max(patience, math.ceil(max_patience_steps / period)))
        out["early_stopping_patience"] = rescaled
    return out


#: The same function under the name it had before ``max_steps`` (it stretches and caps).
stretch_to_min_steps = step_budget

#: Strategies already warned about a stretched budget, per fit (keyed by the id of an object that
#: lives as long as that fit: its prepared data)
_WARNED: dict[int, set[str]] = {}


def warn_if_stretched(
    strategy: str,
    settings: Mapping[str, Any],
    steps_per_epoch: int,
    *,
    n_cells: int,
    batch_size: int,
    once_per: Any,
) -> None:
    """A UserWarning when the ``min_steps`` floor may stretch ``strategy`` past
    :data:`STRETCH_WARNING_EPOCHS` epochs; once per strategy while ``once_per`` lives."""
    budget = step_budget(settings, steps_per_epoch)
    epochs = budget["epochs"]
    if epochs <= max(STRETCH_WARNING_EPOCHS, int(settings["epochs"])):
        return
    key = id(once_per)
    if key not in _WARNED:
        _WARNED[key] = set()
        weakref.finalize(once_per, _WARNED.pop, key, None)
    if strategy in _WARNED[key]:
        return
    _WARNED[key].add(strategy)
    patience = budget["early_stopping_patience"]  # in epochs: a stretched run's epochs are short
    if patience is None:
        stop = "with no early stopping"
    else:
        stop = (
            f"unless early stopping ends it sooner (after {patience} epochs, "
            f"{patience * steps_per_epoch} steps, without improvement)"
        )
    msg = (
        f"strategy {strategy!r}: min_steps={settings['min_steps']} stretches training from "
        f"{settings['epochs']} to up to {epochs} epochs ({steps_per_epoch} optimiser steps per "
        f"epoch: {n_cells} cells at batch_size={batch_size}), so every cell may be seen {epochs} "
        f"times, {stop}. "
        f"For a shorter run lower the floor, training={{{strategy!r}: {{'min_steps': "
        f"{max(settings['min_steps'] // 4, 1)}}}}}, or "
        "give epochs= (exactly that many epochs)."
    )
    warnings.warn(msg, UserWarning, stacklevel=2)


def _check_settings(where: str, settings: Any, allowed: Collection[str]) -> dict[str, Any]:
    """``settings`` (a mapping of setting names) with every value through its check."""
    if not isinstance(settings, Mapping):
        msg = f"{where} must be a dict of training settings, got {type(settings).__name__}."
        raise TypeError(msg)
    unknown = sorted(map(repr, set(settings) - set(allowed)))
    if unknown:
        msg = f"{where} has unknown setting(s) {', '.join(unknown)}; allowed: {sorted(allowed)}."
        raise ValueError(msg)
    return {key: SETTING_CHECKS[key](f"{where}[{key!r}]", v) for key, v in settings.items()}


def check_training_overrides(name: str, overrides: Any) -> dict[str, Any]:
    """``training=``: setting names (for every strategy) and strategy names mapping to dicts of
    settings, each value checked; unknown names are errors, never silently ignored settings.

    Returns the overrides with every value in its canonical type (``{}`` for ``None``).
    """
    if overrides is None:
        return {}
    if isinstance(overrides, str):  # a recipe by name: training="upstream"
        overrides = {"recipe": overrides}
    if not isinstance(overrides, Mapping):
        msg = (
            f"{name} must be None, a recipe name ({', '.join(map(repr, RECIPES))}) or a dict of "
            f"training settings, got {type(overrides).__name__}."
        )
        raise TypeError(msg)
    known = TRAINING_KEYS | set(STRATEGIES) | {"recipe"}
    unknown = sorted(repr(k) for k in overrides if k not in known)
    if unknown:
        msg = (
            f"{name} has unknown setting(s) {', '.join(unknown)}; allowed: the settings "
            f"{sorted(TRAINING_KEYS)}, or a strategy name mapping to a dict of them "
            f"({', '.join(STRATEGIES)})."
        )
        raise ValueError(msg)
    checked = {}
    for key, value in overrides.items():
        if key == "recipe":
            checked[key] = check_choice(f"{name}[{key!r}]", value, RECIPES)
        elif key in TRAINING_KEYS:
            checked[key] = SETTING_CHECKS[key](f"{name}[{key!r}]", value)
        elif key in NEURAL_STRATEGIES:
            checked[key] = _check_settings(f"{name}[{key!r}]", value, _allowed(key))
        else:  # fitted in closed form: no epochs, no learning rate
            where = f"{name}[{key!r}]"
            if isinstance(value, Mapping) and set(value) - set(_defaults(key)):
                msg = (
                    f"{where}: {key} is not trained by gradient descent; it takes class_weight only"
                )
                raise ValueError(msg)
            checked[key] = _check_settings(where, value, _defaults(key))
    return checked
