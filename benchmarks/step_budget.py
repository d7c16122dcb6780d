"""What the default step budget costs at 700, 10k, 100k and 1M labelled cells.

For one strategy under its default settings (``lora`` by default: every encoder-trained strategy
has the same budget), the runner's own functions give the numbers: the outer split
(:func:`~scdlkit._shared.splits.stratified_split`, ``val_size=test_size=0.15``), the calibration
cells carved from its training cells (``calibration_size=0.1``), the inner early-stopping split of
the training cells left, the resolved settings
(:func:`~scdlkit.foundation._training_settings.resolve_training`), the Trainer's budget
(:func:`~scdlkit.foundation._training_settings.step_budget`) and its evaluation periods
(:class:`~scdlkit.training._schedule.Periods`). Nothing is trained: the table is the plan, the
most a run can cost (early stopping may end it sooner).

Columns: cells trained on (``fit``) and cells that decide early stopping (``inner``); optimiser
steps per epoch, in all, and epochs; evaluation period and evaluations; training cell passes
(forward and backward) and inner-split evaluation cell passes (forward only). With
``--train-rate`` and ``--eval-rate`` (cells per second) it adds hours.

Run: ``python benchmarks/step_budget.py [--strategy lora] [--cells 700 10000 ...]``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

CELLS = (700, 10_000, 100_000, 1_000_000)
N_CLASSES = 10  # balanced labels, as many classes as pbmc68k_reduced's bulk_labels


@dataclass
class Budget:
    """The plan of one strategy's training on ``cells`` labelled cells."""

    cells: int
    fit: int
    inner: int
    steps_per_epoch: int
    steps: int
    epochs: int
    period: int
    evaluations: int
    patience: int | None
    lr_decay: float | None
    train_passes: int
    eval_passes: int
    bound: str


def split_sizes(
    cells: int, *, val_size: float, test_size: float, seed: int, calibration_size: float = 0.1
) -> tuple[int, int]:
    """Cells fitted on and cells early stopping reads, as the runner splits ``cells``: the outer
    split, the calibration cells carved from its training cells (``calibration_size`` of the
    labelled cells, stratified), then the inner early-stopping split of what is left."""
    from scdlkit._shared.splits import stratified_split
    from scdlkit.foundation._comparison import draw_calibration

    labels = np.arange(cells) % N_CLASSES
    outer, _ = stratified_split(
        np.arange(cells), labels, val_size=val_size, test_size=test_size, random_state=seed
    )
    train = outer["train"]
    if calibration_size > 0:
        train, _ = draw_calibration(
            train, labels[train], size=calibration_size, n_labelled=cells, random_state=seed
        )
    inner, _ = stratified_split(
        train, labels[train], val_size=val_size, test_size=0.0, random_state=seed
    )
    return len(inner["train"]), len(inner["val"])


def plan(
    strategy: str,
    cells: int,
    *,
    batch_size: int = 64,
    val_size: float = 0.15,
    test_size: float = 0.15,
    calibration_size: float = 0.1,
    seed: int = 42,
) -> Budget:
    """The budget of ``strategy`` (default settings) on ``cells`` labelled cells."""
    from scdlkit.foundation._training_settings import resolve_training, step_budget
    from scdlkit.training._schedule import Periods

    fit, inner = split_sizes(
        cells,
        val_size=val_size,
        test_size=test_size,
        seed=seed,
        calibration_size=calibration_size,
    )
    settings = resolve_training(strategy, None, {})
    per_epoch = math.ceil(fit / batch_size)
    budget = step_budget(settings, per_epoch)
    cap = budget["max_steps"]
    steps = budget["epochs"] * per_epoch if cap is None else min(cap, budget["epochs"] * per_epoch)
    periods = Periods.plan(per_epoch, eval_every=budget["eval_every"], max_steps=cap)
    period = per_epoch if periods.by_epoch else periods.every
    full_epochs, rest = divmod(steps, per_epoch)
    recipe = settings["epochs"] * per_epoch
    bound = "cap" if cap is not None else ("floor" if steps > recipe else "epochs")
    return Budget(
        cells=cells,
        fit=fit,
        inner=inner,
        steps_per_epoch=per_epoch,
        steps=steps,
        epochs=budget["epochs"],
        period=period,
        evaluations=math.ceil(steps / period),
        patience=budget["early_stopping_patience"],
        lr_decay=budget["lr_decay"],
        train_passes=full_epochs * fit + min(rest * batch_size, fit),
        eval_passes=math.ceil(steps / period) * inner,
        bound=bound,
    )


def _epochs(budget: Budget) -> str:
    """Epochs run: whole, or the passes of a run the cap ends mid-epoch (and epochs begun)."""
    if budget.steps == budget.epochs * budget.steps_per_epoch:
        return f"{budget.epochs:,}"
    return f"{budget.steps / budget.steps_per_epoch:.2f} ({budget.epochs} begun)"


def table(budgets: list[Budget], *, train_rate: float | None, eval_rate: float | None) -> list[str]:
    """Markdown rows of ``budgets``; hours where both rates are given."""
    hours = train_rate is not None and eval_rate is not None
    header = [
        "cells",
        "fit / inner",
        "steps/epoch",
        "optimiser steps",
        "epochs",
        "set by",
        "evaluation every",
        "evaluations",
        "patience",
        "lr decay per evaluation",
        "training cell passes",
        "evaluation cell passes",
    ]
    if hours:
        header.append("hours at these rates")
    rows = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for b in budgets:
        every = "epoch" if b.period == b.steps_per_epoch else f"{b.period:,} steps"
        decay = "none" if b.lr_decay is None else f"{b.lr_decay:.4f}"
        cols = [
            f"{b.cells:,}",
            f"{b.fit:,} / {b.inner:,}",
            f"{b.steps_per_epoch:,}",
            f"{b.steps:,}",
            _epochs(b),
            b.bound,
            every,
            f"{b.evaluations:,}",
            "none" if b.patience is None else f"{b.patience:,}",
            decay,
            f"{b.train_passes:,}",
            f"{b.eval_passes:,}",
        ]
        if hours:
            cols.append(f"{(b.train_passes / train_rate + b.eval_passes / eval_rate) / 3600:,.1f}")
        rows.append("| " + " | ".join(cols) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    from scdlkit.foundation._training_settings import resolve_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="lora", help="a neural strategy (default: lora)")
    parser.add_argument("--cells", type=int, nargs="+", default=list(CELLS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-rate", type=float, help="training cells per second")
    parser.add_argument("--eval-rate", type=float, help="evaluation (inference) cells per second")
    args = parser.parse_args(argv)
    settings = resolve_training(args.strategy, None, {})
    print(
        f"strategy {args.strategy}, default settings: epochs={settings['epochs']}, "
        f"min_steps={settings['min_steps']}, max_steps={settings['max_steps']}, "
        f"eval_every={settings['eval_every']}, lr_decay={settings['lr_decay']}, "
        f"early_stopping_patience={settings['early_stopping_patience']}, "
        f"max_patience_steps={settings.get('max_patience_steps')}; "
        f"batch_size={args.batch_size}, val_size=test_size=0.15, calibration_size=0.1, "
        f"{N_CLASSES} balanced classes"
    )
    budgets = [plan(args.strategy, n, batch_size=args.batch_size) for n in args.cells]
    for row in table(budgets, train_rate=args.train_rate, eval_rate=args.eval_rate):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
