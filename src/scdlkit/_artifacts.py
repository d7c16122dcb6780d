"""Files a fitted annotation runner leaves in ``output_dir``: tables, a Markdown report, plots.

Plots are drawn by :mod:`scdlkit.pl` from an AnnData holding the same slots that
:func:`scdlkit.tl.adapt_annotation` writes, so a saved figure and a notebook figure never differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.provenance import package_versions
from scdlkit._shared.slots import fit_summary_uns, write_annotation_slots

__all__ = ["results_adata", "write_artifacts"]

logger = logging.getLogger("scdlkit")
KEY = "scgpt_annotation"


def results_adata(runner: Any) -> AnnData:
    """An obs-only AnnData of the reference cells with the annotation slots written."""

    prepared = runner.prepared_
    codes = prepared.label_codes
    truth = np.where(codes >= 0, np.asarray(runner.label_categories_, dtype=object)[codes], None)
    obs = pd.DataFrame(index=pd.Index(prepared.obs_names.astype(str), name=None))
    obs[runner.label_key] = pd.Categorical(truth, categories=runner.label_categories_)
    adata = AnnData(obs=obs)
    write_annotation_slots(
        adata,
        runner,
        runner.reference_predictions(),
        key_added=KEY,
        split=runner.split_.split_labels(),
        uns=fit_summary_uns(runner),
    )
    return adata


def _markdown_table(frame: pd.DataFrame) -> str:
    def fmt(value: Any) -> str:
        return _number(value) if isinstance(value, float) else str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _environment() -> str:
    try:
        import session_info2

        return str(session_info2.session_info(dependencies=False))
    except Exception as err:
        return f"(session-info2 unavailable: {err})"


def _noise_section(runner: Any) -> list[str]:
    """How much the numbers move, what each interval covers, and the paired differences from
    the baseline."""
    metrics = runner.strategy_metrics_
    n_repeats = getattr(runner, "n_repeats", 1)
    n_strategies = len(metrics)
    if n_repeats > 1:
        kind = "t"
        noise = (
            f"Every strategy was fitted {n_repeats} times (seeds {runner.random_state} to "
            f"{runner.random_state + n_repeats - 1}) on one fixed test set; each repeat redrew "
            "the training and validation cells. The table shows means, the standard deviation "
            "over repeats in the `_sd` columns, and `test_macro_f1_t_ci_low`/`_high`: a 95% t "
            "interval over repeats, widened by Nadeau and Bengio's correction because repeats "
            "share most training cells. It covers the variation from redrawing training cells "
            "and seeds, on this test set; another test set would move the numbers too."
        )
    else:
        kind = "boot"
        noise = (
            "One fitted model per strategy: `test_macro_f1_boot_ci_low`/`_high` are a bootstrap "
            "95% interval over its test cells. It covers which test cells were drawn, not how "
            "the model would change with other training cells or seeds: pass `n_repeats=` (5 "
            "or more) for that."
        )
    lines = ["## Noise", "", noise, ""]
    if "test_macro_f1_vs_baseline" in metrics.columns:
        diff = metrics[
            [
                "strategy",
                "test_macro_f1_vs_baseline",
                f"test_macro_f1_vs_baseline_{kind}_ci_low",
                f"test_macro_f1_vs_baseline_{kind}_ci_high",
            ]
        ]
        how = "t interval over repeats" if kind == "t" else "bootstrap over the same test cells"
        n_compared = max(n_strategies - 1, 0)
        lines += [
            f"Test macro-F1 minus the baseline's, paired ({how}). These are {n_compared} "
            f"comparison{'s' if n_compared != 1 else ''} at once, each with its own 95% "
            "interval: by chance alone about one in twenty such intervals misses, so one "
            "interval that excludes 0 among many is weak evidence; an interval that contains 0 "
            "is no evidence of a difference.",
            "",
            _markdown_table(diff[diff["strategy"] != "baseline"]),
            "",
        ]
    return lines


def _batch_section(runner: Any) -> list[str]:
    frame = getattr(runner, "batch_metrics_", None)
    if frame is None or frame.empty:
        return []
    split = runner.split_summary_
    held_out = ", ".join(split.get("test_batches") or []) or "(test cells of every batch)"
    return [
        "## Per-batch test metrics",
        "",
        f"Batch column `{runner.batch_key}`, split by {split.get('split_by')}; test batches: "
        f"{held_out}. Macro-F1 is over the classes present in each batch's truth or "
        "predictions, as the main metric.",
        "",
        _markdown_table(frame),
        "",
    ]


def _report(runner: Any, adata: AnnData, per_class: pd.DataFrame | None, figures: list[str]) -> str:
    report = runner.report_
    metrics = runner.strategy_metrics_
    best = runner.best_strategy_
    best_row = metrics.set_index("strategy").loc[best]
    ckpt = getattr(runner, "checkpoint_", None)
    title = runner.model_title
    baseline_note = ""
    if "baseline" in set(metrics["strategy"]) and best != "baseline":
        base = metrics.set_index("strategy").loc["baseline", "test_macro_f1"]
        baseline_note = (
            f"\nThe plain baseline (logistic regression on expression) reached test macro-F1 "
            f"{_number(base)}; the best {title} strategy {_number(best_row['test_macro_f1'])}.\n"
        )
    lines = [
        f"# {title} cell-type annotation report",
        "",
        f"Model: {title}" + (f", checkpoint {ckpt.name} ({ckpt.path})" if ckpt is not None else ""),
        "",
        "## Data",
        "",
        "```",
        repr(report),
        "```",
        "",
        f"Split: {runner.split_summary_}",
        "",
        "## Strategy comparison",
        "",
        "Ranked by validation macro-F1 (then balanced accuracy, accuracy, fewer trainable "
        "parameters, runtime); test metrics are reported, never used to choose.",
        "",
        _markdown_table(metrics),
        "",
        f"**Best strategy: `{best}`** (validation macro-F1 "
        f"{_number(best_row['validation_macro_f1'])}, test macro-F1 "
        f"{_number(best_row['test_macro_f1'])}).",
        baseline_note,
        *_final_model_section(runner),
        *_noise_section(runner),
        *_batch_section(runner),
        "## Per-class metrics of the best strategy (test split)",
        "",
        _markdown_table(per_class)
        if per_class is not None
        else "No test cells (test_size=0): nothing was held out to report on.",
        "",
        "## Figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
        "## Environment",
        "",
        f"Package versions: {package_versions()}",
        "",
        "```",
        _environment(),
        "```",
        "",
    ]
    return "\n".join(lines)


#: Figures of the test cells, left out when ``test_size=0`` holds none out.
_TEST_FIGURES = ("strategy_comparison.png", "confusion_matrix.png")


def _number(value: Any) -> str:
    """A metric for the report's prose: three decimals, or "n/a" (no cells to compute it on)."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f}"


def _final_model_section(runner: Any) -> list[str]:
    """Which model the saved runner labels new cells with (``refit=``)."""
    records = getattr(runner, "final_models_", None) or {}
    record = records.get(runner.best_strategy_)
    if not record:
        return []
    if record.get("refit"):
        steps = f", for {record['steps']} optimiser steps" if "steps" in record else ""
        how = (
            f"refitted on {record['n_cells']} cells ({record['fitted_on']}) after "
            f"selection{steps} "
            "(refit=); the metrics above are those of the model fitted on the training cells "
            "alone, evaluated on held-out cells, and the reference's labels come from it too"
        )
    else:
        how = f"the model fitted on the {record['n_cells']} training cells, as evaluated above"
    return [
        "## Saved model",
        "",
        f"The saved runner labels new cells with `{record['strategy']}`: {how}.",
        "",
    ]


def write_artifacts(runner: Any, output_dir: Path) -> None:
    """``strategy_metrics.csv``, ``predictions.csv``, ``report.md`` and PNG plots."""
    # matplotlib and the plots are heavy: imported only when a run writes its artifacts;
    # scdlkit.training's package imports the Trainer (lightning_fabric)
    import matplotlib

    from scdlkit import pl
    from scdlkit.training.metrics import per_class_metrics

    output_dir.mkdir(parents=True, exist_ok=True)
    adata = results_adata(runner)
    runner.strategy_metrics_.to_csv(output_dir / "strategy_metrics.csv", index=False)
    predictions = pd.DataFrame(
        {
            "cell": adata.obs_names,
            "label": adata.obs[runner.label_key].astype(object).to_numpy(),
            "split": adata.obs[f"{KEY}_split"].astype(str).to_numpy(),
            "predicted": adata.obs[KEY].astype(str).to_numpy(),
            "confidence": adata.obs[f"{KEY}_confidence"].to_numpy(),
        }
    )
    predictions.to_csv(output_dir / "predictions.csv", index=False)
    test = runner.split_.test_indices
    codes = runner.prepared_.label_codes
    predicted = runner.reference_predictions()["label_codes"]
    per_class = (
        per_class_metrics(codes[test], predicted[test], labels=runner.label_categories_)
        if len(test)
        else None
    )
    figures = []
    with matplotlib.rc_context({"backend": "Agg"}):
        import matplotlib.pyplot as plt

        plots = {
            "strategy_comparison.png": lambda: pl.strategy_comparison(
                adata, key=KEY, return_fig=True, show=False
            ),
            "confusion_matrix.png": lambda: pl.confusion_matrix(
                adata, key=KEY, return_fig=True, show=False
            ),
            "training_history.png": lambda: pl.training_history(
                adata, key=KEY, return_fig=True, show=False
            ),
            "batch_metrics.png": lambda: pl.batch_metrics(
                adata, key=KEY, return_fig=True, show=False
            ),
        }
        for name, draw in plots.items():
            if name == "training_history.png" and not runner.history_:
                continue
            if name == "batch_metrics.png" and getattr(runner, "batch_metrics_", None) is None:
                continue
            if name in _TEST_FIGURES and not len(test):
                continue
            fig = draw()
            fig.savefig(output_dir / name, dpi=120, bbox_inches="tight")
            plt.close(fig)
            figures.append(name)
    (output_dir / "report.md").write_text(_report(runner, adata, per_class, figures))
    logger.info("annotation artifacts written to %s", output_dir)
