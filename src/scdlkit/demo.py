"""``python -m scdlkit.demo``: the whole annotation path on scanpy's ``pbmc68k_reduced``.

Uses the whole-human scGPT checkpoint when it is found locally (``--checkpoint`` or the cache);
otherwise it builds a small randomly initialised checkpoint in the official layout and says
loudly that the accuracies then mean nothing biologically.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from scdlkit._shared.strategies import DEFAULT_STRATEGIES

__all__ = ["DEMO_STRATEGIES", "main", "run_demo", "write_random_checkpoint"]

BANNER = "=" * 78
#: The defaults (the baseline among them) plus LoRA, each once.
DEMO_STRATEGIES = tuple(dict.fromkeys([*DEFAULT_STRATEGIES, "lora", "baseline"]))


def write_random_checkpoint(
    folder: Path,
    genes: list[str],
    *,
    embsize: int = 64,
    nheads: int = 4,
    d_hid: int = 128,
    nlayers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised scGPT checkpoint (official layout and key names) to ``folder``.

    For demos and tests only: its embeddings carry no biology.
    """
    import torch

    # torch and scdlkit.foundation are imported when the demo runs, not for --help
    from scdlkit.foundation import ScGPTEncoder, ScGPTModelArgs

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {g: i for i, g in enumerate(dict.fromkeys(genes))}
    for special in ("<pad>", "<cls>", "<eoc>"):
        vocab[special] = len(vocab)
    args = ScGPTModelArgs(embsize=embsize, nheads=nheads, d_hid=d_hid, nlayers=nlayers)
    torch.manual_seed(seed)
    model = ScGPTEncoder(args, n_tokens=len(vocab), pad_id=vocab["<pad>"])
    (folder / "args.json").write_text(json.dumps({**args.to_dict(), "fast_transformer": True}))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    torch.save(model.state_dict(), folder / "best_model.pt")
    return folder


def _find_checkpoint(explicit: str | None) -> tuple[str | Path, bool]:
    # scdlkit.foundation brings torch: imported when the demo runs, not for --help
    from scdlkit.foundation import resolve_checkpoint

    if explicit:
        return explicit, True
    try:
        return resolve_checkpoint("whole-human").path, True
    except FileNotFoundError:
        return "", False


def run_demo(
    adata: Any,
    *,
    label_key: str,
    output_dir: Path,
    checkpoint: str | Path | None = None,
    strategies: tuple[str, ...] = DEMO_STRATEGIES,
    epochs: int | None = None,
) -> Any:
    """Inspect, compare ``strategies``, save the runner and artifacts; print the table.

    ``make demo`` calls this on pbmc68k through :func:`main`; the tests call it on fewer cells, so
    the README's command and its test share one code path. Returns the annotated ``adata``.
    """
    import torch

    import scdlkit as sck  # the package itself, lazily: after argument parsing

    out = Path(output_dir)
    found, real = _find_checkpoint(None if checkpoint is None else str(checkpoint))
    if not real:
        found = write_random_checkpoint(out / "random_checkpoint", list(adata.var_names))
        epochs = epochs or 3
        print(BANNER)
        print("NO scGPT CHECKPOINT FOUND: using a small RANDOMLY INITIALISED checkpoint.")
        print("The accuracies below mean NOTHING biologically; they only show the pipeline runs.")
        print("Put the whole-human checkpoint in the cache (see README) for real results.")
        print(BANNER)
    sck.tl.inspect(adata, label_key, checkpoint=found)
    print(
        adata.uns["scgpt_inspect"]["n_genes_matched"], "of", adata.n_vars, "genes in the vocabulary"
    )
    sck.tl.adapt_annotation(
        adata,
        label_key,
        checkpoint=found,
        strategies=tuple(strategies),
        output_dir=out,
        epochs=epochs,
        # torch has no fused CPU attention kernel with dropout; 0 keeps CPU training fast
        attention_dropout=None if torch.cuda.is_available() else 0.0,
        progress=False,
    )
    uns = adata.uns["scgpt_annotation"]
    columns = [
        "strategy",
        "validation_macro_f1",
        "test_macro_f1",
        "test_accuracy",
        "trainable_parameters",
        "runtime_sec",
    ]
    table = uns["strategy_metrics"][columns]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"best strategy: {uns['best_strategy']}")
    adata.write_h5ad(out / "pbmc_annotated.h5ad")
    print(f"artifacts (report.md, metrics, predictions, plots) in {out.resolve()}")
    print(
        f"saved runner in {uns['runner_dir']}; annotated AnnData in {out / 'pbmc_annotated.h5ad'}"
    )
    return adata


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m scdlkit.demo", description=__doc__)
    parser.add_argument(
        "--checkpoint", help="scGPT checkpoint folder (default: whole-human in the cache)"
    )
    parser.add_argument("--output-dir", default="scdlkit_demo", help="where artifacts go")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(DEMO_STRATEGIES),
        help="strategies to compare",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trained strategy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    adata = pbmc.raw.to_adata()  # X of pbmc68k_reduced is scaled; .raw is log-normalised
    adata.obs["bulk_labels"] = pbmc.obs["bulk_labels"].copy()
    run_demo(
        adata,
        label_key="bulk_labels",
        output_dir=Path(args.output_dir),
        checkpoint=args.checkpoint,
        strategies=tuple(dict.fromkeys(args.strategies)),
        epochs=args.epochs,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
