"""The optimiser, its learning-rate schedule (warm-up, decay per evaluation period), when the
Trainer evaluates, and the stopping rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MONITORS",
    "OPTIMIZERS",
    "Periods",
    "Selection",
    "TrainingDivergedError",
    "build_optimizer",
    "diverged",
    "improves",
    "lr_factor",
    "set_lr",
    "warmup_steps",
]

#: ``adafactor`` is torch's (no relative step, no parameter scaling: the IA3 paper's use, at a
#: fixed rate); it keeps its own eps, so ``adam_eps`` does not reach it.
OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adafactor": torch.optim.Adafactor,
}
#: What the Trainer may monitor for the best epoch, and which way is better.
MONITORS = {"val_loss": "min", "val_macro_f1": "max"}


class TrainingDivergedError(ValueError):
    """The training loss or the gradients became NaN or infinite: the learning rate is too high
    for this model and data (a ValueError: the fix is an argument)."""


def diverged(what: str, epoch: int, lr: float, head_lr: float | None) -> TrainingDivergedError:
    """The error for a run whose ``what`` (loss, gradient norm) stopped being finite."""
    rates = f"lr={lr:g}" if head_lr is None else f"lr={lr:g} and head_lr={head_lr:g}"
    smaller = f"lr={lr / 10:g}" if head_lr is None else f"lr={lr / 10:g}, head_lr={head_lr / 10:g}"
    msg = (
        f"training diverged: the {what} became NaN or infinite in epoch {epoch} with {rates}; "
        f"train with a smaller learning rate (e.g. {smaller})."
    )
    return TrainingDivergedError(msg)


def build_optimizer(
    module: torch.nn.Module,
    model: torch.nn.Module,
    *,
    optimizer: str,
    lr: float,
    head_lr: float | None,
    weight_decay: float,
    eps: float,
) -> torch.optim.Optimizer:
    """The optimiser over ``module``'s trainable parameters, the head at its own rate if asked.

    ``head_lr`` needs ``model.head_parameters()`` (the parameters of a freshly initialised head);
    every group keeps its peak rate in ``"peak_lr"`` so one schedule scales them all alike.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if head_lr is None:
        groups = [{"params": trainable, "peak_lr": lr}]
    else:
        if not callable(getattr(model, "head_parameters", None)):
            msg = (
                f"`head_lr` needs a model with a head_parameters() method; "
                f"{type(model).__name__} has none. Leave head_lr=None."
            )
            raise ValueError(msg)
        head = {id(p) for p in model.head_parameters()}
        groups = [
            {"params": [p for p in trainable if id(p) not in head], "peak_lr": lr},
            {"params": [p for p in trainable if id(p) in head], "peak_lr": head_lr},
        ]
        groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = group["peak_lr"]
    if optimizer == "adafactor":
        return OPTIMIZERS[optimizer](groups, lr=lr, weight_decay=weight_decay)
    return OPTIMIZERS[optimizer](groups, lr=lr, weight_decay=weight_decay, eps=eps)


def lr_factor(step: int, period_index: int, warmup: int, lr_decay: float | None) -> float:
    """The schedule's factor on each group's peak rate: linear warm-up, then decay per evaluation
    period (an epoch, or ``eval_every`` steps on large data; see :class:`Periods`)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if lr_decay is not None:
        factor *= lr_decay**period_index
    return factor


def set_lr(optimizer: Any, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def warmup_steps(warmup: float | int, total_steps: int) -> int:
    if isinstance(warmup, int):
        return warmup
    return math.ceil(warmup * total_steps)


def improves(value: Any, best: Any, direction: str) -> bool:
    """Whether the monitored ``value`` beats ``best`` (``direction`` ``"min"`` or ``"max"``)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if direction == "min" else value > best


@dataclass(frozen=True)
class Periods:
    """When the Trainer evaluates, decays the rate and may stop: the evaluation periods.

    A period is an epoch, unless an epoch holds more than ``eval_every`` optimiser steps: then it
    is ``eval_every`` steps (counted across epoch boundaries; the run's last period may be
    shorter). ``max_steps`` ends the run after that many steps, mid-epoch if need be.
    """

    every: int | None
    max_steps: int | None

    @classmethod
    def plan(
        cls, steps_per_epoch: int, *, eval_every: int | None, max_steps: int | None
    ) -> Periods:
        """The periods of a run whose epochs hold ``steps_per_epoch`` optimiser steps."""
        long_epochs = eval_every is not None and steps_per_epoch > eval_every
        return cls(every=eval_every if long_epochs else None, max_steps=max_steps)

    @property
    def by_epoch(self) -> bool:
        """Whether a period is an epoch (evaluated at its end)."""
        return self.every is None

    def ends_after(self, step: int) -> bool:
        """Whether a period ends after optimiser step ``step`` (1-based) within an epoch."""
        return (self.every is not None and step % self.every == 0) or self.done(step)

    def done(self, step: int) -> bool:
        """Whether ``step`` steps reach ``max_steps``."""
        return self.max_steps is not None and step >= self.max_steps


class Selection:
    """The best period so far by the monitored value, and the early-stopping rule.

    ``patience`` counts evaluation periods without improvement (``None``: never stop early).
    """

    def __init__(self, direction: str, patience: int | None) -> None:
        self.direction = direction
        self.patience = patience
        self.best: Any = None
        self.stale = 0

    def update(self, value: Any) -> bool:
        """Record one period's ``value``; whether it is the best so far."""
        if improves(value, self.best, self.direction):
            self.best, self.stale = value, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` periods passed without improvement."""
        return self.patience is not None and self.stale >= self.patience
