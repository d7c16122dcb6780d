"""Pick the encoder-trained strategies' defaults on validation cells, never on test cells.

Each strategy's settings are tuned one at a time, in the order of :data:`SEARCH`, starting from
the published value of every setting (scGPT's tutorial for ``full_finetune``, scPEFT's tutorial
or the method's paper for the parameter-efficient ones; :data:`SEARCH` names each source). For one
setting, every candidate value is fitted with the other settings at their current choice, on
``--seeds`` splits (the runner's ``n_repeats``: splits and model seeds ``0..seeds-1``, one outer
test set), and scored on the **validation** split's macro-F1. The best mean replaces the
published value only if it is ahead of it by more than one pooled sd
(``sqrt((sd_best**2 + sd_published**2) / 2)``); otherwise the published value is kept and the
next setting is tuned from there. Test metrics are printed beside, and never read by the choice.

Two data settings, each tuned on its own; a new value becomes the default where one chose it and
the other does not have it behind the published value by more than one pooled sd
(:func:`default_of`):

- ``planted``: issue 19's planted-signal cells (600 cells, 6 classes each written in 6 marker
  genes, ``benchmarks/planted_signal.py``) with the tiny random fixture
  ``tests/data/scgpt-tiny-flash/checkpoint``: can the strategy teach an encoder where to look?
  The share of ``<cls>``'s attention on each cell's own markers is printed (first seed's model).
- ``pbmc``: pbmc68k_reduced (``.raw``, ``bulk_labels``) with the tiny fixture pretrained on those
  cells, ``tests/data/scgpt-tiny-pbmc-pretrained/checkpoint``: does it keep what a pretrained
  encoder knows?

Usage::

    python benchmarks/tune_defaults.py --out tuning.md                # every strategy, 5 seeds
    python benchmarks/tune_defaults.py --strategies ia3 --data planted --settings input_norm
    python benchmarks/tune_defaults.py --quick --out /tmp/tuning.md   # smoke run, about a minute

The full search fits 28 distinct candidates per data setting at 5 seeds and the default
budget (up to 2,000 optimiser steps each, early stopping after at most 100 without improvement):
hours on a GPU, days on two CPU cores. ``--min-steps``
shortens the budget (the table says so). The classifier-input normalisation reaches the runner
as ``training={"input_norm": ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def _load_planted() -> Any:
    name = "scdlkit_benchmarks_planted_signal"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "planted_signal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


planted_signal = _load_planted()


@dataclass(frozen=True)
class Setting:
    """One tuned setting of a strategy.

    ``kind`` says where it goes: ``"training"`` (``training={strategy: {name: value}}``),
    ``"config"`` (``strategy_configs={strategy: {name: value}}``) or ``"input_norm"`` (the
    classifier-input normalisation). ``published`` is the value kept unless another is clearly
    better; ``source`` says where it comes from.
    """

    name: str
    kind: str
    values: tuple[Any, ...]
    published: Any
    source: str

    def __post_init__(self) -> None:
        if self.published not in self.values:
            msg = f"{self.name}: the published value {self.published!r} must be a candidate."
            raise ValueError(msg)


INPUT_NORM = Setting(
    "input_norm",
    "input_norm",
    ("frozen", "layernorm", "batch"),
    "frozen",
    "scdlkit's until now (upstream scGPT and scPEFT feed the raw <cls> vector)",
)
ENCODER_DROPOUT = Setting(
    "encoder_dropout",
    "training",
    (0.2, 0.0),
    0.2,
    "scGPT and scPEFT tutorials (args.json dropout 0.2)",
)
SCPEFT_LR = "scPEFT tutorial (Adam, lr 5e-5)"
#: Per strategy, the settings in the order they are tuned: the rate first (at the published
#: rate nothing else can be judged), then the classifier input at the chosen rate.
SEARCH: dict[str, tuple[Setting, ...]] = {
    "full_finetune": (
        Setting(
            "lr", "training", (1e-4, 3e-4, 1e-3), 1e-4, "scGPT tutorial (the new head at 1e-3)"
        ),
        INPUT_NORM,
        ENCODER_DROPOUT,
    ),
    "lora": (
        Setting(
            "lr",
            "training",
            (5e-4, 1e-3, 3e-3),
            5e-4,
            "LoRA paper (RoBERTa-base, 5e-4); scPEFT's 5e-5 is at LoRA scale 1/8, not comparable",
        ),
        INPUT_NORM,
        Setting(
            "target_modules",
            "config",
            (("q", "v"), ("q", "k", "v")),
            ("q", "v"),
            "scPEFT (enable_lora=[True, False, True]), LoRA paper",
        ),
        ENCODER_DROPOUT,
    ),
    "adapter": (
        Setting("lr", "training", (5e-5, 1e-3, 3e-3), 5e-5, SCPEFT_LR),
        INPUT_NORM,
        Setting(
            "placement",
            "config",
            ("post_norm", "attention"),
            "post_norm",
            "scPEFT (after norm1); 'attention' is Houlsby's, before the residual",
        ),
        ENCODER_DROPOUT,
    ),
    "prefix_tuning": (
        Setting("lr", "training", (5e-5, 1e-3, 3e-3), 5e-5, SCPEFT_LR),
        INPUT_NORM,
        ENCODER_DROPOUT,
    ),
    "ia3": (
        Setting("lr", "training", (1e-3, 3e-3), 3e-3, "IA3 paper (Liu et al. 2022, Adafactor)"),
        INPUT_NORM,
        ENCODER_DROPOUT,
    ),
}
#: The smoke run: one strategy, one setting with two candidates, one epoch, few cells.
QUICK = {
    "strategies": ("ia3",),
    "settings": {"input_norm": ("frozen", "layernorm")},
    "seeds": 2,
    "training": {"epochs": 1},
    "planted_cells": 120,
    "pbmc_per_class": 10,
}


@dataclass(frozen=True)
class DataSetting:
    name: str
    label_key: str
    checkpoint: Path
    description: str


DATA = {
    "planted": DataSetting(
        "planted",
        "cell_type",
        planted_signal.RANDOM_CHECKPOINT,
        "planted-signal cells, tiny random fixture",
    ),
    "pbmc": DataSetting(
        "pbmc",
        "bulk_labels",
        planted_signal.PRETRAINED / "checkpoint",
        "pbmc68k_reduced, tiny fixture pretrained on it",
    ),
}


# ------------------------------------------------------------------------------ the rule


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """``sqrt((var(a) + var(b)) / 2)`` with sample variances; NaN with fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2))


def choose(
    values: Sequence[Any], validation_scores: Sequence[Sequence[float]], published: Any
) -> tuple[Any, str]:
    """The value to keep, from validation scores only, and why.

    Parameters
    ----------
    values
        The candidate values of one setting.
    validation_scores
        Per candidate, its validation macro-F1 on each seed.
    published
        The published value (one of ``values``).

    Returns
    -------
    ``(value, reason)``: the best mean if it beats the published value's by more than one pooled
    sd, else the published value.
    """
    means = [float(np.mean(s)) for s in validation_scores]
    reference = list(values).index(published)
    best = int(np.argmax(means))
    if best == reference:
        return published, "the published value has the best mean"
    gain = means[best] - means[reference]
    spread = pooled_sd(validation_scores[best], validation_scores[reference])
    label = show(values[best])
    if math.isnan(spread):
        return published, f"{label} ahead by {gain:.3f}, too few seeds for an sd: published kept"
    if gain > spread:
        return values[best], f"{label} ahead by {gain:.3f} > pooled sd {spread:.3f}"
    return published, f"{label} ahead by {gain:.3f} <= pooled sd {spread:.3f}: published kept"


# ------------------------------------------------------------------------------ fitting


def show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    if value is None:
        return "None"
    return str(value)


def runner_arguments(
    strategy: str,
    candidate: Mapping[str, Any],
    settings: Sequence[Setting],
    budget: Mapping[str, Any] | None,
) -> tuple[dict, dict | None, str | None]:
    """``(training, strategy_configs, input_norm)`` of one candidate."""
    kinds = {s.name: s.kind for s in settings}
    training = {**(budget or {})}
    training.update({k: v for k, v in candidate.items() if kinds[k] == "training"})
    config = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in candidate.items()
        if kinds[k] == "config"
    }
    input_norm = candidate.get("input_norm")
    return {strategy: training}, ({strategy: config} if config else None), input_norm


def fit_candidate(
    data: DataSetting,
    adata: Any,
    strategy: str,
    candidate: Mapping[str, Any],
    settings: Sequence[Setting],
    *,
    seeds: int,
    budget: Mapping[str, Any] | None,
    device: str,
    precision: str,
) -> dict[str, Any]:
    """Fit one candidate on ``seeds`` splits; validation and (reported only) test metrics."""
    import scdlkit as sck

    training, configs, input_norm = runner_arguments(strategy, candidate, settings, budget)
    start = time.perf_counter()
    with planted_signal.classifier_input_norm(training, input_norm) as resolved:
        runner = sck.AnnotationRunner(
            label_key=data.label_key,
            checkpoint=data.checkpoint,
            strategies=(strategy,),
            strategy_configs=configs,
            training=resolved,
            n_repeats=seeds,
            random_state=0,
            device=device,
            precision=precision,
            progress=False,
        ).fit(adata)
    seconds = time.perf_counter() - start
    repeats = runner.repeat_metrics_
    repeats = repeats[repeats["strategy"] == strategy]
    out = {
        "val_macro_f1": repeats["validation_macro_f1"].to_numpy(dtype=float),
        "test_accuracy": repeats["test_accuracy"].to_numpy(dtype=float),
        "test_macro_f1": repeats["test_macro_f1"].to_numpy(dtype=float),
        "seconds": seconds,
    }
    if data.name == "planted":
        encoder = runner.results_[strategy].model.encoder
        shares = planted_signal.cls_attention_on_markers(encoder, adata, data.checkpoint)
        out["cls_on_markers"] = shares
    return out


def _key(data: str, strategy: str, candidate: Mapping[str, Any]) -> str:
    return json.dumps([data, strategy, {k: show(v) for k, v in sorted(candidate.items())}])


def tune_strategy(
    data: DataSetting,
    adata: Any,
    strategy: str,
    settings: Sequence[Setting],
    *,
    seeds: int,
    budget: Mapping[str, Any] | None,
    device: str,
    precision: str,
    cache: dict[str, dict],
) -> tuple[list[dict], list[dict]]:
    """Tune ``settings`` of ``strategy`` one at a time on ``data``: candidate rows, choices."""
    current = {s.name: s.published for s in settings}
    rows, choices = [], []
    for setting in settings:
        scores = []
        for value in setting.values:
            candidate = {**current, setting.name: value}
            key = _key(data.name, strategy, candidate)
            if key not in cache:
                cache[key] = fit_candidate(
                    data,
                    adata,
                    strategy,
                    candidate,
                    settings,
                    seeds=seeds,
                    budget=budget,
                    device=device,
                    precision=precision,
                )
            result = cache[key]
            scores.append(result["val_macro_f1"])
            row = candidate_row(data, strategy, setting, value, candidate, result)
            rows.append(row)
            print("  " + "; ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        chosen, reason = choose(setting.values, scores, setting.published)
        current[setting.name] = chosen
        choices.append(
            {
                "data": data.name,
                "strategy": strategy,
                "setting": setting.name,
                "published": show(setting.published),
                "source": setting.source,
                "chosen": show(chosen),
                "reason": reason,
                "scores": {show(v): list(s) for v, s in zip(setting.values, scores, strict=True)},
            }
        )
        print(f"  -> {data.name} {strategy} {setting.name}: {show(chosen)} ({reason})", flush=True)
    return rows, choices


def _mean_sd(values: Sequence[float]) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def candidate_row(
    data: DataSetting,
    strategy: str,
    setting: Setting,
    value: Any,
    candidate: Mapping[str, Any],
    result: Mapping[str, Any],
) -> dict[str, Any]:
    others = ", ".join(f"{k} {show(v)}" for k, v in candidate.items() if k != setting.name)
    row = {
        "data": data.name,
        "strategy": strategy,
        "setting": setting.name,
        "value": show(value) + (" (published)" if value == setting.published else ""),
        "with": others or "-",
        "val macro-F1": _mean_sd(result["val_macro_f1"]),
        "test accuracy (not used)": _mean_sd(result["test_accuracy"]),
        "test macro-F1 (not used)": _mean_sd(result["test_macro_f1"]),
    }
    if "cls_on_markers" in result:
        row["<cls> on markers, per layer"] = " / ".join(
            f"{x:.3f}" for x in result["cls_on_markers"]
        )
    row["s per seed"] = f"{result['seconds'] / max(len(result['val_macro_f1']), 1):.0f}"
    return row


def not_behind(scores: Mapping[str, Sequence[float]], value: str, published: str) -> bool:
    """Whether ``value``'s mean validation score is at most one pooled sd below the published
    value's (with too few seeds for an sd: not below it at all)."""
    gap = float(np.mean(scores[published]) - np.mean(scores[value]))
    spread = pooled_sd(scores[value], scores[published])
    return gap <= (0.0 if math.isnan(spread) else spread)


def default_of(
    chosen: Mapping[str, str], scores: Mapping[str, Mapping], published: str, data_names
) -> str:
    """The default of one setting from each data setting's choice: a value other than the
    published one where one data setting chose it (ahead by more than a pooled sd) and no other
    has it behind the published value by more than a pooled sd; else the published value.

    The two data settings ask different things (can a strategy learn where to look; does it
    keep what a pretrained encoder knows), so a value clearly better at one and no worse at the
    other is taken. Every data setting must have run; two different new values keep the
    published one.
    """
    if any(d not in chosen for d in data_names):
        return published
    new = {chosen[d] for d in data_names} - {published}
    if len(new) != 1:
        return published
    value = new.pop()
    others = [d for d in data_names if chosen[d] != value]
    return value if all(not_behind(scores[d], value, published) for d in others) else published


def combine(choices: list[dict], data_names: Sequence[str]) -> pd.DataFrame:
    """One row per (strategy, setting): each data setting's choice and the default
    (:func:`default_of`)."""
    frame = pd.DataFrame(choices)
    out = []
    for (strategy, setting), group in frame.groupby(["strategy", "setting"], sort=False):
        chosen = dict(zip(group["data"], group["chosen"], strict=True))
        scores = dict(zip(group["data"], group["scores"], strict=True))
        published = group["published"].iloc[0]
        default = default_of(chosen, scores, published, data_names)
        out.append(
            {
                "strategy": strategy,
                "setting": setting,
                "published (source)": f"{published} ({group['source'].iloc[0]})",
                **{
                    d: f"{chosen[d]} ({reason})"
                    for d, reason in zip(group["data"], group["reason"], strict=True)
                },
                "default": default,
            }
        )
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------ output


def machine() -> str:
    """CPU model, native bf16 flags and torch threads; the GPU where one is used."""
    import torch

    model, flags = platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = {f for f in ("avx512_bf16", "amx_bf16") if f in text.split()}
    bf16 = ", ".join(sorted(flags)) if flags else "no avx512_bf16/amx_bf16"
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model} ({bf16}), {torch.get_num_threads()} torch threads{gpu}"


def markdown(frame: pd.DataFrame) -> str:
    frame = frame.fillna("-").astype(str)
    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def report(rows: list[dict], decisions: pd.DataFrame, header: list[str]) -> str:
    return "\n".join(
        [
            "## Defaults tuned on validation macro-F1 (`benchmarks/tune_defaults.py`)",
            "",
            *header,
            "",
            "### Candidates",
            "",
            "Mean ± sd over the seeds. Only the validation column chooses; test columns are "
            "reported.",
            "",
            markdown(pd.DataFrame(rows)),
            "",
            "### Chosen",
            "",
            "The best validation mean replaces the published value only if ahead by more than "
            "one pooled sd; a new value becomes the default where one data setting chose it and "
            "no other has it behind the published value by more than one pooled sd.",
            "",
            markdown(decisions),
            "",
        ]
    )


def load_data(name: str, *, planted_cells: int = 600, pbmc_per_class: int | None = None) -> Any:
    """The data of one setting; ``pbmc_per_class`` keeps at most that many cells per class."""
    if name == "planted":
        return planted_signal.planted_signal_adata(n_cells=planted_cells)
    adata = planted_signal.pbmc_adata()
    if pbmc_per_class is None:
        return adata
    rng = np.random.default_rng(0)
    labels = adata.obs[DATA["pbmc"].label_key].to_numpy()
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:pbmc_per_class] for c in pd.unique(labels)]
    )
    return adata[np.sort(keep)].copy()


def restrict(
    strategies: Sequence[str], only: Mapping[str, Sequence[Any]] | Sequence[str] | None
) -> dict[str, tuple[Setting, ...]]:
    """:data:`SEARCH` for ``strategies``, keeping only the named settings (with given values)."""
    out = {}
    for strategy in strategies:
        if strategy not in SEARCH:
            msg = f"no search for {strategy!r}; tuned strategies: {', '.join(SEARCH)}."
            raise ValueError(msg)
        settings = SEARCH[strategy]
        if only is not None:
            kept = []
            for s in settings:
                if s.name not in only:
                    continue
                if isinstance(only, Mapping):
                    s = Setting(s.name, s.kind, tuple(only[s.name]), s.published, s.source)
                kept.append(s)
            settings = tuple(kept)
        if settings:
            out[strategy] = settings
    return out


def _values(values: Sequence[Any]) -> tuple[Any, ...]:
    """Candidate values from JSON: lists (e.g. LoRA targets) become tuples."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=None, choices=list(SEARCH))
    parser.add_argument("--data", choices=("planted", "pbmc", "both"), default="both")
    parser.add_argument("--settings", nargs="+", default=None, help="tune only these settings")
    parser.add_argument("--seeds", type=int, default=5, help="splits per candidate (>= 5)")
    parser.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help="optimiser-step budget of every candidate (default: the runner's, 2,000)",
    )
    parser.add_argument(
        "--plan",
        type=json.loads,
        default=None,
        help="JSON {strategy: {setting: [values]}}: tune only these (each list holds the "
        'published value), e.g. \'{"ia3": {"input_norm": ["frozen", "layernorm"]}}\'',
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ia3, input_norm frozen/layernorm, 2 seeds, 1 epoch, 120 planted cells",
    )
    args = parser.parse_args(argv)

    budget: dict[str, Any] | None = None
    planted_cells, pbmc_per_class = 600, None
    if args.quick:
        strategies = args.strategies or QUICK["strategies"]
        search = restrict(strategies, QUICK["settings"])
        seeds, budget = QUICK["seeds"], QUICK["training"]
        planted_cells, pbmc_per_class = QUICK["planted_cells"], QUICK["pbmc_per_class"]
    else:
        search = restrict(args.strategies or list(SEARCH), args.settings)
        if args.plan is not None:
            search = {
                strategy: restrict([strategy], {k: _values(v) for k, v in plan.items()})[strategy]
                for strategy, plan in args.plan.items()
            }
        seeds = args.seeds
        if args.min_steps is not None:
            budget = {"min_steps": args.min_steps}
    data_names = ["planted", "pbmc"] if args.data == "both" else [args.data]
    header = [
        f"Command: `python benchmarks/tune_defaults.py {' '.join(argv or sys.argv[1:])}`.",
        f"Machine: {machine()}; precision {args.precision}; {platform.python_version()}.",
        f"Seeds: {seeds} splits per candidate (split and model seeds 0-{seeds - 1}, one outer "
        "test set); budget: "
        + (json.dumps(budget) if budget else "the runner's default (up to 2,000 steps)")
        + ".",
        "Data: "
        + "; ".join(f"`{d}`: {DATA[d].description}" for d in data_names)
        + (f" ({planted_cells} planted cells)" if planted_cells != 600 else "")
        + (f" (pbmc: at most {pbmc_per_class} cells per class)" if pbmc_per_class else "")
        + ".",
    ]
    print("\n".join(header), flush=True)
    rows, choices, cache = [], [], {}
    for name in data_names:
        adata = load_data(name, planted_cells=planted_cells, pbmc_per_class=pbmc_per_class)
        for strategy, settings in search.items():
            print(f"{name}: {strategy}", flush=True)
            new_rows, new_choices = tune_strategy(
                DATA[name],
                adata,
                strategy,
                settings,
                seeds=seeds,
                budget=budget,
                device=args.device,
                precision=args.precision,
                cache=cache,
            )
            rows += new_rows
            choices += new_choices
    decisions = combine(choices, data_names)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 80)
    print("\ncandidates (only validation chooses):")
    print(pd.DataFrame(rows).to_string(index=False))
    print("\nchosen:")
    print(decisions.to_string(index=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report(rows, decisions, header))
        print(f"\nwrote {args.out}")
    return decisions


if __name__ == "__main__":
    main()
