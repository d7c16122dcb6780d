"""``scdlkit``: the command line over :mod:`scdlkit.tl`, for pipelines.

Sub-commands ``inspect``, ``embed``, ``adapt`` and ``annotate`` read an ``.h5ad`` file, run one
tool and write the result atomically. ``scdlkit --help`` lists them; :func:`main` runs them
in-process and returns the exit code (0 success, 1 unexpected error, 2 usage or input error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from scdlkit._shared.strategies import DEFAULT_STRATEGIES, STRATEGIES
from scdlkit._version import __version__

__all__ = ["main"]

PROG = "scdlkit"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TABLE_COLUMNS = (
    "strategy",
    "validation_macro_f1",
    "test_macro_f1",
    "test_accuracy",
    "trainable_parameters",
    "runtime_sec",
)
#: Errors that mean "the input or the options are wrong" (exit 2, no traceback unless -v).
INPUT_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

logger = logging.getLogger("scdlkit")


class InputError(ValueError):
    """A problem with the command line's files (exit 2)."""


# --------------------------------------------------------------------------------- parser

DESCRIPTION = """\
Adapt the scGPT single-cell foundation model to labelled AnnData for cell-type annotation.
Each command reads an .h5ad file, runs one scdlkit tool and writes the result atomically
(temporary file beside the target, then renamed).

  scdlkit inspect ref.h5ad --label-key cell_type --checkpoint path/to/scGPT_human
  scdlkit adapt ref.h5ad --label-key cell_type -o ref_annotated.h5ad --strategies frozen_probe head
  scdlkit annotate query.h5ad --runner ref_annotated_scdlkit/runner -o query_annotated.h5ad
  scdlkit embed cells.h5ad -o cells_embedded.h5ad

Exit codes: 0 success; 1 unexpected error (with traceback); 2 usage or input error (bad option,
missing or unreadable file, unusable data, or blocking problems found by 'inspect'); 130 when
interrupted.
"""


def _paragraphs(text: str) -> str:
    """Wrap each blank-line separated paragraph to 78 columns; keep indented ones (examples)."""
    out = []
    for block in text.strip().split("\n\n"):
        if block.startswith("  "):
            out.append(block.rstrip())
        else:
            out.append(textwrap.fill(" ".join(block.split()), 78, break_on_hyphens=False))
    return "\n\n".join(out)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the (pre-wrapped) description; appends ``(default: ...)`` where a help lacks it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def _logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``-q``/``-v``, on the top parser and on every sub-command (either place works)."""
    default: Any = 0 if top else argparse.SUPPRESS
    group = parser.add_argument_group("output and logging")
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=default,
        help="only log errors of the 'scdlkit' logger and hide progress bars",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default,
        help="log more: -v for progress messages (INFO), -vv for debugging (DEBUG); also shows "
        "tracebacks of errors. Default: warnings only",
    )


def _input_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("input", metavar=what.split()[0].upper() + ".h5ad", help=f"{what} (.h5ad)")


def _checkpoint_option(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    if default is None:
        text = "base scGPT checkpoint (default: the one recorded when the runner was saved)"
    else:
        text = (
            "scGPT checkpoint: a folder holding args.json, vocab.json and best_model.pt, or an "
            "official name such as 'whole-human' looked up in $SCDLKIT_CACHE_DIR/scgpt/<name>/ "
            f"(default: {default!r})"
        )
    parser.add_argument("--checkpoint", default=default, metavar="C", help=text)


def _gene_layer_options(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    where = "the reference's" if inherit else "adata.var_names"
    parser.add_argument(
        "--gene-key",
        metavar="G",
        help=f"adata.var column holding gene symbols (default: {where})",
    )
    where = "the reference's" if inherit else "adata.X"
    parser.add_argument(
        "--layer", metavar="L", help=f"adata.layers key holding the values (default: {where})"
    )


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA, then MPS, then CPU) or a torch device such as 'cpu' or 'cuda:1' "
        "(default: 'auto')",
    )


def _precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="'auto' (bf16 autocast where the hardware runs bf16 natively: CUDA, CPUs with AMX "
        "or AVX512-BF16; fp32 elsewhere), 'fp32' or 'bf16' (default: 'auto')",
    )


def _streaming_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "atlas scale",
        "Under torchrun (torchrun --nproc-per-node=N -m scdlkit ...) each process handles a "
        "share of the cells and the first one writes OUT.h5ad.",
    )
    group.add_argument(
        "--backed",
        action="store_true",
        help="open the input backed (read_h5ad(backed='r')) and stream it in chunks, so memory "
        "depends on --chunk-size, not on the number of cells",
    )
    group.add_argument(
        "--chunk-size",
        type=_positive_int,
        metavar="N",
        help="cells read, tokenised and run at a time (default: all cells in memory; 50000 with "
        "--backed); results do not depend on it",
    )


def _output_option(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=required,
        metavar="OUT.h5ad",
        help=f"{what}; written atomically (temporary file beside it, then renamed); missing "
        "folders are created",
    )


def _key_added_option(parser: argparse.ArgumentParser, default: str, slots: str) -> None:
    parser.add_argument(
        "--key-added", default=default, metavar="KEY", help=f"{slots} (default: {default!r})"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        msg = f"must be a fraction in [0, 1), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``scdlkit`` argument parser with its four sub-commands.

    Returns
    -------
    The parser; each sub-command sets ``func`` to the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_paragraphs(DESCRIPTION),
        formatter_class=_HelpFormatter,
        epilog="Run 'scdlkit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    _logging_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=_paragraphs(description),
            formatter_class=_HelpFormatter,
        )
        return sub

    # inspect ------------------------------------------------------------------------------
    sub = command(
        "inspect",
        "preflight an AnnData for scGPT (gene overlap, labels, values)",
        "Preflight an AnnData for scGPT: gene overlap with the vocabulary, labels, value type and "
        "sequence lengths (sck.tl.inspect). Reads only the checkpoint's vocab.json and "
        "args.json.\n\n"
        "Prints the report; exits 0 when the data can be used and 2 when blocking problems were "
        "found (the report says how to fix each).",
    )
    _input_option(sub, "input AnnData")
    sub.add_argument(
        "--label-key",
        metavar="K",
        help="adata.obs column with cell types (default: none, check genes and values only)",
    )
    _checkpoint_option(sub, default="whole-human")
    _gene_layer_options(sub)
    _output_option(sub, required=False, what="also write the AnnData with the report in uns[KEY]")
    sub.add_argument(
        "--json",
        metavar="REPORT.json",
        help="also write the report as JSON (written atomically, also when problems were found)",
    )
    _key_added_option(sub, "scgpt_inspect", "uns key of the report in OUT.h5ad")
    _logging_options(sub, top=False)
    sub.set_defaults(func=run_inspect)

    # embed --------------------------------------------------------------------------------
    sub = command(
        "embed",
        "embed cells with the frozen scGPT encoder",
        "Embed cells with a pretrained scGPT encoder, no training (sck.tl.embed). Writes the "
        "L2-normalised <cls> embedding to obsm['X_KEY'] and the parameters to uns['KEY'].",
    )
    _input_option(sub, "input AnnData with gene symbols, raw counts or log-normalised values")
    _output_option(sub, required=True, what="AnnData to write, with obsm['X_KEY'] added")
    _checkpoint_option(sub, default="whole-human")
    _gene_layer_options(sub)
    sub.add_argument(
        "--batch-size", type=_positive_int, default=64, metavar="N", help="cells per forward pass"
    )
    _device_option(sub)
    _precision_option(sub)
    _streaming_options(sub)
    _key_added_option(sub, "scgpt", "writes obsm['X_KEY'] and uns['KEY']")
    _logging_options(sub, top=False)
    sub.set_defaults(func=run_embed)

    # adapt --------------------------------------------------------------------------------
    sub = command(
        "adapt",
        "adapt scGPT to labelled cells, compare strategies, keep the best",
        "Adapt scGPT to the labelled cells of a reference (sck.tl.adapt_annotation): fit every "
        "strategy on a stratified train split, rank them by validation macro-F1, keep the best, "
        "label every cell and save the fitted runner for 'scdlkit annotate'.\n\n"
        "Writes obs['KEY'], obs['KEY_confidence'], obs['KEY_split'], obsm['X_KEY'] and "
        "uns['KEY']; prints the comparison table and the runner folder.",
    )
    _input_option(sub, "reference AnnData with gene symbols and cell-type labels")
    sub.add_argument(
        "--label-key",
        required=True,
        metavar="K",
        help="adata.obs column with cell types; empty values mark unlabelled cells (left out of "
        "training and evaluation, still labelled)",
    )
    _output_option(sub, required=True, what="annotated reference to write")
    _checkpoint_option(sub, default="whole-human")
    sub.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        default=list(DEFAULT_STRATEGIES),
        metavar="S",
        help=f"strategies to compare, among {', '.join(STRATEGIES)} ('baseline': logistic "
        "regression on log-normalised expression, no scGPT) "
        f"(default: {' '.join(DEFAULT_STRATEGIES)})",
    )
    sub.add_argument(
        "--output-dir",
        metavar="DIR",
        help="folder for the saved runner (DIR/runner) and the artifacts (metrics and predictions "
        "CSV, report.md, plots) (default: OUT without .h5ad plus '_scdlkit', beside OUT)",
    )
    sub.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        help="training epochs of every neural strategy (default: each strategy's own default)",
    )
    sub.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help="learning rate of every neural strategy (default: each strategy's own default)",
    )
    sub.add_argument(
        "--batch-size",
        type=_positive_int,
        default=64,
        metavar="N",
        help="cells per batch for training and inference",
    )
    sub.add_argument(
        "--val-size",
        type=_fraction,
        default=0.15,
        metavar="F",
        help="fraction of labelled cells held out to select the best strategy",
    )
    sub.add_argument(
        "--test-size",
        type=_fraction,
        default=0.15,
        metavar="F",
        help="fraction of labelled cells held out for the final report",
    )
    sub.add_argument(
        "--random-state",
        type=int,
        default=42,
        metavar="SEED",
        help="seed of splits, tokenisation, initialisation and training",
    )
    _device_option(sub)
    _precision_option(sub)
    _gene_layer_options(sub)
    group = sub.add_argument_group("batches (donors, studies, technologies)")
    group.add_argument(
        "--batch-key",
        metavar="B",
        help="adata.obs column of batches: test metrics are also reported per batch "
        "(default: none)",
    )
    group.add_argument(
        "--split-by",
        choices=("cells", "batch"),
        default="cells",
        help="'cells': stratified random split; 'batch': hold out whole batches for validation "
        "and test, to measure transfer to unseen batches (needs --batch-key)",
    )
    group.add_argument(
        "--test-batches",
        nargs="+",
        metavar="NAME",
        help="with --split-by batch, the batches to test on (default: drawn with --random-state)",
    )
    group.add_argument(
        "--val-batches",
        nargs="+",
        metavar="NAME",
        help="with --split-by batch, the batches to validate on (default: drawn)",
    )
    sub.add_argument(
        "--confidence-threshold",
        type=float,
        metavar="P",
        help="label cells whose top probability is below P as 'Unknown' (default: none)",
    )
    sub.add_argument(
        "--attention-dropout",
        type=float,
        metavar="P",
        help="dropout on attention weights while training; 0 is several times faster on CPU "
        "(default: the checkpoint's dropout, as upstream)",
    )
    _key_added_option(sub, "scgpt_annotation", "prefix of the written obs/obsm/uns slots")
    _logging_options(sub, top=False)
    sub.set_defaults(func=run_adapt)

    # annotate -----------------------------------------------------------------------------
    sub = command(
        "annotate",
        "label new cells with a runner saved by 'scdlkit adapt'",
        "Label query cells with a fitted annotation runner (sck.tl.annotate). Writes "
        "obs['KEY'], obs['KEY_confidence'], obs['KEY_split'] ('query'), obsm['X_KEY'] and "
        "uns['KEY'].",
    )
    _input_option(sub, "query AnnData with gene symbols")
    sub.add_argument(
        "--runner",
        required=True,
        metavar="DIR",
        help="folder of a saved runner: the 'runner folder' printed by 'scdlkit adapt' "
        "(uns['scgpt_annotation']['runner_dir'] of its output)",
    )
    _output_option(sub, required=True, what="annotated query to write")
    _checkpoint_option(sub, default=None)
    _gene_layer_options(sub, inherit=True)
    _device_option(sub)
    _streaming_options(sub)
    _key_added_option(sub, "scgpt_annotation", "prefix of the written obs/obsm/uns slots")
    _logging_options(sub, top=False)
    sub.set_defaults(func=run_annotate)
    return parser


# ---------------------------------------------------------------------------------- files


def read_input(path: str | os.PathLike, *, backed: bool = False) -> Any:
    """Read an ``.h5ad`` file, with a clear error when it is missing or unreadable.

    Parameters
    ----------
    path
        The file.
    backed
        Open it backed (read-only): ``X`` stays on disk and is read in chunks.

    Returns
    -------
    The :class:`~anndata.AnnData`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    InputError
        It exists but is not a readable ``.h5ad`` file.
    """
    path = Path(path)
    if not path.exists():
        msg = f"input file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    if path.is_dir():
        msg = f"input {str(path)!r} is a folder; expected an .h5ad file"
        raise InputError(msg)
    import anndata as ad

    logger.info("reading %s", path)
    try:
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except Exception as err:  # h5py raises bare OSError for non-HDF5 files
        msg = f"cannot read {str(path)!r} as an .h5ad file: {err}"
        raise InputError(msg) from err


def check_output(path: str | os.PathLike | None) -> Path | None:
    """Fail early (before any work) when ``path`` cannot be written; create its folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        msg = f"output {str(path)!r} is a folder; expected a file name such as out.h5ad"
        raise InputError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        msg = f"cannot write to the folder {str(path.parent)!r} of output {str(path)!r}"
        raise PermissionError(msg)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file is removed when the block fails, so ``path`` is either the old file or the
    complete new one, never a partial write. It gets the usual permissions (umask), not 0600.
    """
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".partial" + path.suffix
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_h5ad_atomic(adata: Any, path: Path) -> None:
    """``adata.write_h5ad`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    logger.info("wrote %s", path)


def write_backed_atomic(adata: Any, source: Path, path: Path) -> None:
    """Write a backed AnnData's results without reading its ``X`` into memory.

    ``source`` (the file ``adata`` is backed by) is copied beside ``path`` and its ``obs``,
    ``obsm`` and ``uns`` are replaced by ``adata``'s, then the copy is renamed onto ``path``.
    """
    import shutil

    import h5py
    from anndata.io import write_elem

    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "a") as f:
            for name, value in (
                ("obs", adata.obs),
                ("obsm", dict(adata.obsm)),
                ("uns", dict(adata.uns)),
            ):
                if name in f:
                    del f[name]
                write_elem(f, name, value)
    logger.info("wrote %s", path)


def _write_result(adata: Any, args: argparse.Namespace, out: Path) -> None:
    if args.backed:
        write_backed_atomic(adata, Path(args.input), out)
    else:
        write_h5ad_atomic(adata, out)


def write_json_atomic(data: Any, path: Path) -> None:
    """JSON (numpy values as plain numbers and lists) through :func:`atomic_path`."""

    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=plain) + "\n")


# ---------------------------------------------------------------------------- distributed


@contextlib.contextmanager
def _torchrun_group(device: str) -> Iterator[bool]:
    """Join the process group of a ``torchrun``/SLURM launch; yield whether to write outputs.

    Outside such a launch (``WORLD_SIZE`` unset or 1), or when the caller already set up a
    group, nothing is done and every process writes. Otherwise the group is joined (NCCL on
    CUDA, gloo elsewhere), each process takes the GPU of its ``LOCAL_RANK``, and only rank 0
    writes; the tools shard the cells across the group and gather the results in cell order.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield True
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_rank() == 0
        return
    cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        logger.info("process %d of %d", dist.get_rank(), dist.get_world_size())
        yield dist.get_rank() == 0
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- commands


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def run_inspect(args: argparse.Namespace) -> int:
    """``scdlkit inspect``: print the preflight report; 2 when it found blocking problems."""
    import scdlkit as sck
    from scdlkit.foundation import ScGPTAnnotationDataReport

    out = check_output(args.output)
    json_out = check_output(args.json)
    adata = read_input(args.input)
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
    import scdlkit as sck

    out = check_output(args.output)
    adata = read_input(args.input, backed=args.backed)
    with _torchrun_group(args.device) as writer:
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
            _write_result(adata, args, out)
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


def run_adapt(args: argparse.Namespace) -> int:
    """``scdlkit adapt``: fit and compare strategies, write the annotated reference."""
    import scdlkit as sck

    out = check_output(args.output)
    # absolute, so uns['runner_dir'] in OUT.h5ad still points to the runner from another folder
    output_dir = (Path(args.output_dir) if args.output_dir else default_output_dir(out)).resolve()
    adata = read_input(args.input)
    sck.tl.adapt_annotation(
        adata,
        args.label_key,
        checkpoint=args.checkpoint,
        strategies=tuple(args.strategies),
        batch_size=args.batch_size,
        val_size=args.val_size,
        test_size=args.test_size,
        random_state=args.random_state,
        device=args.device,
        output_dir=output_dir,
        key_added=args.key_added,
        gene_key=args.gene_key,
        layer=args.layer,
        epochs=args.epochs,
        lr=args.lr,
        precision=args.precision,
        confidence_threshold=args.confidence_threshold,
        attention_dropout=args.attention_dropout,
        batch_key=args.batch_key,
        split_by=args.split_by,
        test_batches=args.test_batches,
        val_batches=args.val_batches,
        progress=_progress(args),
    )
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


def run_annotate(args: argparse.Namespace) -> int:
    """``scdlkit annotate``: label query cells with a saved runner."""
    import scdlkit as sck

    out = check_output(args.output)
    runner = Path(args.runner)
    if not runner.is_dir():
        msg = (
            f"runner folder {str(runner)!r} does not exist (see 'runner folder:' of scdlkit adapt)"
        )
        raise FileNotFoundError(msg)
    adata = read_input(args.input, backed=args.backed)
    with _torchrun_group(args.device) as writer:
        sck.tl.annotate(
            adata,
            runner,
            checkpoint=args.checkpoint,
            gene_key=args.gene_key,
            layer=args.layer,
            device=args.device,
            chunk_size=args.chunk_size,
            key_added=args.key_added,
        )
        if writer:
            _write_result(adata, args, out)
    if not writer:
        return EXIT_OK
    counts = adata.obs[args.key_added].value_counts()
    print(f"labelled {adata.n_obs} cells with {adata.uns[args.key_added]['best_strategy']}:")
    print(counts.to_string())
    print(f"AnnData written to {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _logging(verbosity: int) -> Iterator[None]:
    """Send the ``scdlkit`` logger to stderr at the chosen level for the duration of a command."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(min(verbosity, 2), -1), logging.DEBUG
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    old_level = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])  # str(KeyError) adds quotes
    return str(err) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scdlkit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    The exit code: 0 success, 1 unexpected error, 2 usage or input error (also when
    ``inspect`` finds blocking problems), 130 when interrupted.

    Examples
    --------
    >>> from scdlkit.cli import main
    >>> main(["inspect", "ref.h5ad", "--label-key", "cell_type"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    verbosity = args.verbose - args.quiet
    func: Callable[[argparse.Namespace], int] = args.func
    with _logging(verbosity):
        try:
            return func(args)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except INPUT_ERRORS as err:
            if verbosity > 0:
                traceback.print_exc()
            print(f"{PROG}: error: {_message(err)}", file=sys.stderr)
            return EXIT_USAGE
        except Exception as err:
            traceback.print_exc()
            print(
                f"{PROG}: error: unexpected {type(err).__name__}: {_message(err)} "
                "(a bug? please report it with the traceback above)",
                file=sys.stderr,
            )
            return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
