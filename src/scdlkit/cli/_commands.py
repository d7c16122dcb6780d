"""The sub-commands: each checks its options and paths, reads the input, runs one tool, writes.

Every check that can fail (output paths, ``--device``, the runner folder) runs before the input
is read, so a wrong option never costs a model run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import scdlkit as sck
from scdlkit.cli._checks import (
    EXIT_OK,
    EXIT_USAGE,
    check_device,
    check_output,
    check_output_dir,
)
from scdlkit.cli._distributed import torchrun_group
from scdlkit.cli._io import (
    atomic_path,
    read_input,
    write_h5ad_atomic,
    write_json_atomic,
    write_result,
)

__all__ = [
    "default_output_dir",
    "run_adapt",
    "run_annotate",
    "run_embed",
    "run_inspect",
    "run_markers",
]

PROG = "scdlkit"
TABLE_COLUMNS = (
    "strategy",
    "validation_macro_f1",
    "test_macro_f1",
    "test_accuracy",
    "test_coverage",
    "test_set_size",
    "trainable_parameters",
    "runtime_sec",
)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def run_inspect(args: argparse.Namespace) -> int:
    """``scdlkit inspect``: print the preflight report; 2 when it found blocking problems."""
    out = check_output(args.output)
    json_out = check_output(args.json, what="--json")
    adata = read_input(args.input)
    # here, not at the top: scdlkit.foundation imports torch, which 'scdlkit --help' never needs
    from scdlkit.foundation import ScGPTAnnotationDataReport

    sck.tl.inspect(
        adata,
        args.label_key,
        checkpoint=args.checkpoint,
        gene_key=args.gene_key,
        layer=args.layer,
        key_added=args.key_added,
    )
    report = dict(adata.uns[args.key_added])
    fields = ScGPTAnnotationDataReport.__dataclass_fields__
    print(repr(ScGPTAnnotationDataReport(**{k: v for k, v in report.items() if k in fields})))
    if json_out is not None:
        write_json_atomic(report, json_out)
        print(f"report written to {json_out}")
    if out is not None:
        write_h5ad_atomic(adata, out)
        print(f"AnnData written to {out} (report in uns[{args.key_added!r}])")
    if report["ok"]:
        return EXIT_OK
    n = len(report["problems"])
    print(
        f"{PROG}: error: {n} blocking problem{'s' if n != 1 else ''} found (see PROBLEM lines)",
        file=sys.stderr,
    )
    return EXIT_USAGE


def run_embed(args: argparse.Namespace) -> int:
    """``scdlkit embed``: write the frozen ``<cls>`` embedding to ``obsm['X_KEY']``."""
    out = check_output(args.output)
    check_device(args.device)
    adata = read_input(args.input, backed=args.backed)
    with torchrun_group(args.device) as writer:
        sck.tl.embed(
            adata,
            checkpoint=args.checkpoint,
            gene_key=args.gene_key,
            layer=args.layer,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            chunk_size=args.chunk_size,
            progress=_progress(args),
            key_added=args.key_added,
        )
        if writer:
            write_result(adata, source=Path(args.input), path=out, backed=args.backed)
    if not writer:
        return EXIT_OK
    key = f"X_{args.key_added}"
    print(
        f"embedded {adata.n_obs} cells ({adata.obsm[key].shape[1]} dimensions) into obsm[{key!r}]"
    )
    print(f"AnnData written to {out}")
    return EXIT_OK


def default_output_dir(output: Path) -> Path:
    """``ref_annotated.h5ad`` -> ``ref_annotated_scdlkit/`` beside it."""
    stem = output.name[: -len(".h5ad")] if output.name.endswith(".h5ad") else output.name
    return output.with_name(f"{stem}_scdlkit")


def _adapt_options(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """The annotation runner's arguments of ``scdlkit adapt``."""
    return {
        "checkpoint": args.checkpoint,
        "strategies": tuple(args.strategies),
        "batch_size": args.batch_size,
        "val_size": args.val_size,
        "test_size": args.test_size,
        "random_state": args.random_state,
        "n_repeats": args.n_repeats,
        "calibration_size": args.calibration_size,
        "calibration_batches": args.calibration_batches,
        "refit": args.refit,
        "keep": args.keep,
        "device": args.device,
        "output_dir": output_dir,
        "overwrite": args.overwrite,
        "gene_key": args.gene_key,
        "layer": args.layer,
        "epochs": args.epochs,
        "lr": args.lr,
        "precision": args.precision,
        "confidence_threshold": args.confidence_threshold,
        "attention_dropout": args.attention_dropout,
        "batch_key": args.batch_key,
        "split_by": args.split_by,
        "test_batches": args.test_batches,
        "val_batches": args.val_batches,
        "progress": _progress(args),
    }


def run_adapt(args: argparse.Namespace) -> int:
    """``scdlkit adapt``: fit and compare strategies, write the annotated reference."""
    out = check_output(args.output)
    # absolute, so uns['runner_dir'] in OUT.h5ad still points to the runner from another folder
    output_dir = (Path(args.output_dir) if args.output_dir else default_output_dir(out)).resolve()
    check_output_dir(output_dir)
    check_device(args.device)
    options = _adapt_options(args, output_dir)
    # the runner's own checks (options that only fail together, such as the two fractions),
    # before the input is read: building a runner reads and computes nothing
    sck.AnnotationRunner(label_key=args.label_key, **options)
    adata = read_input(args.input)
    sck.tl.adapt_annotation(adata, args.label_key, key_added=args.key_added, **options)
    write_h5ad_atomic(adata, out)
    uns = adata.uns[args.key_added]
    table = uns["strategy_metrics"]
    table = table[[c for c in TABLE_COLUMNS if c in table.columns]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"best strategy: {uns['best_strategy']}")
    print(f"runner folder: {uns['runner_dir']}")
    print(f"artifacts (report.md, metrics, predictions, plots) in {output_dir}")
    print(f"AnnData written to {out}")
    return EXIT_OK


def check_runner_folder(path: str) -> Path:
    """``--runner`` as a path; FileNotFoundError, before any work, when it is not a folder."""
    runner = Path(path)
    if not runner.is_dir():
        msg = (
            f"runner folder {str(runner)!r} does not exist (see 'runner folder:' of scdlkit adapt)"
        )
        raise FileNotFoundError(msg)
    return runner


def run_annotate(args: argparse.Namespace) -> int:
    """``scdlkit annotate``: label query cells with a saved runner."""
    out = check_output(args.output)
    check_device(args.device)
    runner = check_runner_folder(args.runner)
    adata = read_input(args.input, backed=args.backed)
    with torchrun_group(args.device) as writer:
        sck.tl.annotate(
            adata,
            runner,
            checkpoint=args.checkpoint,
            gene_key=args.gene_key,
            layer=args.layer,
            device=args.device,
            chunk_size=args.chunk_size,
            key_added=args.key_added,
            confidence_threshold=args.confidence_threshold,
            error_rate=args.error_rate,
            unknown_label=args.unknown_label,
            majority_voting=args.majority_voting,
            over_clustering=args.over_clustering,
            min_prop=args.min_prop,
            probabilities=args.probabilities,
            strategy=args.strategy,
        )
        if writer:
            write_result(adata, source=Path(args.input), path=out, backed=args.backed)
    if not writer:
        return EXIT_OK
    counts = adata.obs[args.key_added].value_counts()
    print(f"labelled {adata.n_obs} cells with {adata.uns[args.key_added]['strategy']}:")
    print(counts.to_string())
    print(f"AnnData written to {out}")
    return EXIT_OK


def run_markers(args: argparse.Namespace) -> int:
    """``scdlkit markers``: the genes behind each predicted label of an annotated AnnData."""
    out = check_output(args.output)
    csv = check_output(args.csv, what="--csv")
    check_device(args.device)
    if args.runner is not None:
        check_runner_folder(args.runner)
    adata = read_input(args.input, backed=args.backed)
    sck.tl.annotation_markers(
        adata,
        key=args.key,
        runner=args.runner,
        n_genes=args.n_genes,
        n_steps=args.n_steps,
        max_cells_per_label=args.max_cells_per_label,
        checkpoint=args.checkpoint,
        gene_key=args.gene_key,
        layer=args.layer,
        device=args.device,
        batch_size=args.batch_size,
        random_state=args.random_state,
    )
    write_result(adata, source=Path(args.input), path=out, backed=args.backed)
    markers = adata.uns[f"{args.key}_markers"]
    if csv is not None:
        with atomic_path(csv) as tmp:
            markers.to_csv(tmp, index=False)
    top = markers[markers["rank"] <= 5].groupby("label", sort=False)["gene"].agg(", ".join)
    print(f"top genes of {len(top)} labels (all {args.n_genes} in uns['{args.key}_markers']):")
    for label, genes in top.items():
        print(f"  {label}: {genes}")
    if csv is not None:
        print(f"markers table written to {csv}")
    print(f"AnnData written to {out}")
    return EXIT_OK
