"""Can every strategy learn under its defaults? Planted-signal data and the pretrained fixture.

1. Planted signal (issue 19): 600 cells over 600 genes of the tiny fixture's vocabulary, 6 classes,
   each marked by 6 genes expressed high (log1p of lognormal(2.5, 0.3)) on a random background of
   120 genes (log1p of lognormal(0, 0.8)); the tiny random fixture; default settings.
2. pbmc68k_reduced (``.raw``, ``bulk_labels``) with the tiny fixture pretrained on those cells
   (``scgpt-tiny-pbmc-pretrained``): every encoder-trained strategy should reach at least
   frozen_probe's test macro-F1 minus 0.05.

Usage: ``python benchmarks/planted_signal.py [--strategies ...] [--seeds 0 1 2] [--input-norm
layernorm] [--strategy-configs '{"adapter": {"placement": "post_norm"}}']``. Prints one table per
data set (fp32, so the numbers mean the same on every CPU) and names the machine. Validation
metrics are printed beside the test metrics; only validation may choose a setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd

from scdlkit._shared.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
RANDOM_CHECKPOINT = ROOT / "tests" / "data" / "scgpt-tiny-flash" / "checkpoint"
PRETRAINED = ROOT / "tests" / "data" / "scgpt-tiny-pbmc-pretrained"


def planted_signal_adata(
    checkpoint: Path = RANDOM_CHECKPOINT,
    *,
    n_cells: int = 600,
    n_genes: int = 600,
    n_classes: int = 6,
    n_markers: int = 6,
    n_background: int = 120,
    marker_mean: float = 2.5,
    seed: int = 0,
) -> ad.AnnData:
    """Cells whose class is written in a few marker genes (``obs["cell_type"]``); markers are
    log1p of lognormal(``marker_mean``, 0.3), the background of lognormal(0, 0.8)."""
    rng = np.random.default_rng(seed)
    vocab = json.loads((Path(checkpoint) / "vocab.json").read_text())
    genes = sorted(g for g in vocab if not g.startswith("<"))
    genes = list(rng.choice(genes, size=n_genes, replace=False))
    labels = np.repeat(np.arange(n_classes), n_cells // n_classes)
    markers = rng.choice(n_genes, size=(n_classes, n_markers), replace=False)
    x = np.zeros((len(labels), n_genes), dtype=np.float32)
    for i, c in enumerate(labels):
        background = rng.choice(n_genes, size=n_background, replace=False)
        x[i, background] = np.log1p(rng.lognormal(0.0, 0.8, size=n_background))
        x[i, markers[c]] = np.log1p(rng.lognormal(marker_mean, 0.3, size=n_markers))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{c}" for c in labels])},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    marker_of = np.full(n_genes, "", dtype=object)
    for c in range(n_classes):
        marker_of[markers[c]] = f"type{c}"
    return ad.AnnData(x, obs=obs, var=pd.DataFrame({"marker_of": marker_of}, index=genes))


def cls_attention_on_markers(encoder: Any, adata: ad.AnnData, checkpoint: Path) -> list[float]:
    """Share of ``<cls>``'s attention that lands on the cell's own marker genes, per layer.

    The mean over cells and heads of the attention weights from the ``<cls>`` query to the
    positions of the cell's class markers (``var["marker_of"]``), computed from each layer's own
    (possibly adapted) query-key projection and prefix, in evaluation mode. Uniform attention
    gives about 6 / 127 = 0.05; an encoder that reads the markers puts far more on them.
    """
    import torch

    from scdlkit.foundation import resolve_checkpoint, tokenize_adata
    from scdlkit.foundation.models.scgpt._tokenize import collate_tokens

    tokens, match = tokenize_adata(adata, resolve_checkpoint(checkpoint))
    vocab_ids = np.asarray(match.vocab_ids)
    marker_of = adata.var["marker_of"].to_numpy()
    cell_types = adata.obs["cell_type"].astype(str).to_numpy()
    layers = list(encoder.transformer_encoder.layers)
    shares: list[list[float]] = [[] for _ in layers]
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Any:
        def capture(module: Any, args: tuple) -> None:
            x, attn_mask = args[0], args[1]
            batch, length, _ = x.shape
            qkv = module.Wqkv(x).view(batch, length, 3, module.nhead, module.head_dim)
            q = qkv[:, :1, 0].transpose(1, 2)  # (batch, heads, 1, head_dim): <cls>'s query
            k = qkv[:, :, 1].transpose(1, 2)
            if attn_mask is None:  # no padding in this batch
                keep = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=x.device)
            else:
                keep = attn_mask
            n_prefix = 0
            if module.prefix is not None:
                prefix_k = module.prefix(batch)[0].to(k.dtype)
                n_prefix = prefix_k.shape[2]
                k = torch.cat([prefix_k, k], dim=2)
                keep = torch.cat([keep.new_ones((*keep.shape[:-1], n_prefix)), keep], dim=-1)
            scores = (q @ k.transpose(-1, -2)) / module.head_dim**0.5
            probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
            captured[index] = probs[:, :, 0, n_prefix:]  # (batch, heads, length)

        return capture

    handles = [layer.self_attn.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for start in range(0, tokens.n_cells, 64):
                cells = np.arange(start, min(start + 64, tokens.n_cells))
                batch = collate_tokens(tokens, cells)
                encoder(batch["gene_ids"], batch["values"], batch["padding_mask"])
                gene_ids = batch["gene_ids"].numpy()
                for row, cell in enumerate(cells):
                    own = vocab_ids[marker_of == cell_types[cell]]
                    on_marker = torch.as_tensor(np.isin(gene_ids[row], own))
                    for i in range(len(layers)):
                        share = captured[i][row][:, on_marker].sum(-1).mean()
                        shares[i].append(float(share))
    finally:
        for handle in handles:
            handle.remove()
        encoder.train(was_training)
    return [float(np.mean(values)) for values in shares]


@contextlib.contextmanager
def classifier_input_norm(
    training: Mapping[str, Any] | None, input_norm: str | None
) -> Iterator[dict[str, Any] | None]:
    """``training`` for a runner whose neural strategies normalise the ``<cls>`` input by
    ``input_norm`` (``None``: the runner's default), as ``training={"input_norm": ...}``."""
    if input_norm is None:
        yield None if training is None else dict(training)
        return
    yield {**(training or {}), "input_norm": input_norm}


def pbmc_adata() -> ad.AnnData:
    return ad.read_h5ad(PRETRAINED / "data.h5ad")


def _encoder_of(runner: Any, strategy: str, checkpoint: Path) -> Any:
    """The encoder a strategy predicts with (the frozen checkpoint for probe and head)."""
    from scdlkit.foundation import load_scgpt_model

    model = runner.results_[strategy].model
    encoder = getattr(model, "encoder", None)
    if strategy in {"frozen_probe", "head"} or encoder is None:
        return load_scgpt_model(checkpoint, device="cpu")
    return encoder


def run(
    adata: ad.AnnData,
    label_key: str,
    checkpoint: Path,
    strategy: str,
    seed: int,
    *,
    training: dict | None = None,
    strategy_configs: dict | None = None,
    input_norm: str | None = None,
    attention: bool = False,
    keep_last: bool = False,
) -> dict:
    """Fit one strategy; with ``attention``, also measure ``<cls>`` attention on the markers.

    ``strategy_configs`` and ``input_norm`` (the classifier-input normalisation, see
    :func:`classifier_input_norm`) are passed to the runner. ``keep_last`` is a diagnosis: the
    Trainer keeps the last epoch's weights instead of restoring the best one, so metrics and
    attention describe the model at the end of training.
    """
    from scdlkit.foundation import ScGPTAnnotationRunner
    from scdlkit.training import Trainer

    keeping = (
        mock.patch.object(Trainer, "_restore", return_value=None)
        if keep_last
        else contextlib.nullcontext()
    )
    configs = (
        {strategy: strategy_configs[strategy]} if strategy in (strategy_configs or {}) else None
    )
    start = time.perf_counter()
    with keeping, classifier_input_norm(training, input_norm) as resolved:
        runner = ScGPTAnnotationRunner(
            label_key=label_key,
            checkpoint=checkpoint,
            strategies=(strategy,),
            strategy_configs=configs,
            training=resolved,
            random_state=seed,
            precision="fp32",
            progress=False,
        ).fit(adata)
    seconds = time.perf_counter() - start
    row = runner.strategy_metrics_.iloc[0]
    trainer = (runner.results_[strategy].training or {}).get("trainer", {})
    history = runner.history_.get(strategy)
    kept = history.loc[history["val_loss"].idxmin()] if history is not None else None
    out = {
        "strategy": strategy,
        "seed": seed,
        "input_norm": getattr(runner.results_[strategy].model, "input_norm", ""),
        "val_accuracy": row["validation_accuracy"],
        "val_macro_f1": row["validation_macro_f1"],
        "test_accuracy": row["test_accuracy"],
        "test_macro_f1": row["test_macro_f1"],
        # the kept epoch's training and inner-split losses: a low train loss beside a high
        # inner loss is memorisation; both near ln(n_classes) is no learning at all
        "train_loss": float(kept["train_loss"]) if kept is not None else np.nan,
        "inner_val_loss": float(kept["val_loss"]) if kept is not None else np.nan,
        "final_train_loss": float(history["train_loss"].iloc[-1]) if kept is not None else np.nan,
        "epochs_run": len(history) if history is not None else 0,
        "epoch_budget": trainer.get("epochs", ""),
        "seconds": seconds,
    }
    if attention and strategy != "baseline":
        shares = cls_attention_on_markers(
            _encoder_of(runner, strategy, checkpoint), adata, checkpoint
        )
        out.update({f"cls_on_markers_l{i + 1}": share for i, share in enumerate(shares)})
    print(
        "  "
        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()),
        flush=True,
    )
    return out


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    columns = {
        "val_accuracy": ("val_accuracy", "mean"),
        "val_accuracy_sd": ("val_accuracy", "std"),
        "val_macro_f1": ("val_macro_f1", "mean"),
        "val_macro_f1_sd": ("val_macro_f1", "std"),
        "test_accuracy": ("test_accuracy", "mean"),
        "test_accuracy_sd": ("test_accuracy", "std"),
        "test_macro_f1": ("test_macro_f1", "mean"),
        "test_macro_f1_sd": ("test_macro_f1", "std"),
        "train_loss": ("train_loss", "mean"),
        "inner_val_loss": ("inner_val_loss", "mean"),
        "final_train_loss": ("final_train_loss", "mean"),
    }
    columns.update({c: (c, "mean") for c in frame.columns if c.startswith("cls_on_markers")})
    columns.update(
        epochs_run=("epochs_run", "median"),
        epoch_budget=("epoch_budget", "first"),
        seconds=("seconds", "median"),
    )
    return frame.groupby("strategy", sort=False).agg(**columns)


def repeated_comparison(
    data: str,
    strategies: list[str],
    n_repeats: int,
    training: Mapping[str, Any] | None,
    *,
    strategy_configs: dict | None = None,
    input_norm: str | None = None,
) -> str:
    """One runner with every strategy on ``n_repeats`` splits, as a user runs the comparison: a
    markdown table of validation and test macro-F1 (mean ± sd over repeats), the corrected t
    interval of test macro-F1 (Nadeau-Bengio) and the runtime per repeat."""
    from scdlkit.foundation import ScGPTAnnotationRunner

    if data == "planted":
        adata, key, checkpoint = planted_signal_adata(), "cell_type", RANDOM_CHECKPOINT
    else:
        adata, key, checkpoint = pbmc_adata(), "bulk_labels", PRETRAINED / "checkpoint"
    start = time.perf_counter()
    with classifier_input_norm(training, input_norm) as resolved:
        runner = ScGPTAnnotationRunner(
            label_key=key,
            checkpoint=checkpoint,
            strategies=tuple(strategies),
            strategy_configs={k: v for k, v in (strategy_configs or {}).items() if k in strategies}
            or None,
            training=resolved,
            n_repeats=n_repeats,
            precision="fp32",
            progress=False,
            random_state=0,
        ).fit(adata)
    seconds = time.perf_counter() - start
    m = runner.strategy_metrics_
    lines = [
        f"{n_repeats} repeats (one outer test set), {seconds:.0f} s in all; "
        f"best: {runner.best_strategy_}",
        "",
        "| strategy | val macro-F1 | test macro-F1 | corrected 95% interval | test accuracy "
        "| runtime s per repeat |",
        "|---|---|---|---|---|---:|",
    ]
    for _, row in m.iterrows():
        lines.append(
            f"| `{row['strategy']}` | {row['validation_macro_f1']:.3f} ± "
            f"{row['validation_macro_f1_sd']:.3f} | {row['test_macro_f1']:.3f} ± "
            f"{row['test_macro_f1_sd']:.3f} | {row['test_macro_f1_t_ci_low']:.3f} to "
            f"{row['test_macro_f1_t_ci_high']:.3f} | {row['test_accuracy']:.3f} ± "
            f"{row['test_accuracy_sd']:.3f} | {row['runtime_sec']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", choices=("planted", "pbmc", "both"), default="both")
    parser.add_argument(
        "--training", type=json.loads, default=None, help="training= overrides, as JSON"
    )
    parser.add_argument(
        "--strategy-configs",
        type=json.loads,
        default=None,
        help='strategy_configs=, as JSON, e.g. \'{"adapter": {"placement": "post_norm"}}\'',
    )
    parser.add_argument(
        "--input-norm",
        default=None,
        help="classifier-input normalisation of the neural strategies (frozen, layernorm, batch)",
    )
    parser.add_argument(
        "--n-repeats",
        type=int,
        default=1,
        help="one runner per data set with every strategy on this many splits (one outer test "
        "set): mean ± sd and the corrected 95%% t interval of test macro-F1",
    )
    parser.add_argument(
        "--keep-last",
        action="store_true",
        help="diagnosis: keep the last epoch's weights, not the best (planted data)",
    )
    args = parser.parse_args(argv)
    from scdlkit._shared.hardware import native_bf16

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"native bf16: {native_bf16('cpu')}; precision fp32"
    )
    pd.set_option("display.width", 160)
    if args.n_repeats > 1:
        for name in ("planted", "pbmc") if args.data == "both" else (args.data,):
            print(f"\n{name}:")
            table_text = repeated_comparison(
                name,
                args.strategies,
                args.n_repeats,
                args.training,
                strategy_configs=args.strategy_configs,
                input_norm=args.input_norm,
            )
            print(table_text)
        return
    if args.data in {"planted", "both"}:
        adata = planted_signal_adata()
        rows = [
            run(
                adata,
                "cell_type",
                RANDOM_CHECKPOINT,
                s,
                seed,
                training=args.training,
                strategy_configs=args.strategy_configs,
                input_norm=args.input_norm,
                attention=True,
                keep_last=args.keep_last,
            )
            for seed in args.seeds
            for s in args.strategies
        ]
        print(
            "\nplanted signal, tiny random fixture (goal: test accuracy >= 0.8); "
            "cls_on_markers_lN: share of <cls> attention on the cell's own markers in layer N "
            "(uniform: about 0.05)"
        )
        print(table(rows).round(3).to_string())
    if args.data in {"pbmc", "both"}:
        adata = pbmc_adata()
        rows = [
            run(
                adata,
                "bulk_labels",
                PRETRAINED / "checkpoint",
                s,
                seed,
                training=args.training,
                strategy_configs=args.strategy_configs,
                input_norm=args.input_norm,
            )
            for seed in args.seeds
            for s in args.strategies
        ]
        frame = table(rows)
        print("\npbmc68k_reduced, pretrained tiny fixture (goal: >= frozen_probe macro-F1 - 0.05)")
        print(frame.round(3).to_string())


if __name__ == "__main__":
    main()
