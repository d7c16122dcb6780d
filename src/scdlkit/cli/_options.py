"""Option helpers shared by the sub-commands, the help formatter and the value checks."""

from __future__ import annotations

import argparse
import math
import textwrap
from typing import Any, NoReturn

__all__ = [
    "MAX_SEED",
    "HelpFormatter",
    "Parser",
    "checkpoint_option",
    "device_option",
    "fraction",
    "gene_layer_options",
    "input_option",
    "key_added_option",
    "logging_options",
    "output_option",
    "paragraphs",
    "positive_int",
    "positive_number",
    "precision_option",
    "seed",
    "streaming_options",
    "unit_interval",
]

#: The largest seed numpy and Lightning accept (the runner checks the same bound).
MAX_SEED = 2**32 - 1


def paragraphs(text: str) -> str:
    """Wrap each blank-line separated paragraph to 78 columns; keep indented ones (examples)."""
    out = []
    for block in text.strip().split("\n\n"):
        if block.startswith("  "):
            out.append(block.rstrip())
        else:
            out.append(textwrap.fill(" ".join(block.split()), 78, break_on_hyphens=False))
    return "\n\n".join(out)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error of the
    command line: ``scdlkit: error: <what>; see 'scdlkit adapt --help'`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"scdlkit: error: {line}; see '{self.prog} --help'\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the (pre-wrapped) description; appends ``(default: ...)`` where a help lacks it."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def logging_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
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


def input_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("input", metavar=what.split()[0].upper() + ".h5ad", help=f"{what} (.h5ad)")


def checkpoint_option(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    if default is None:
        text = "base checkpoint (default: the one recorded when the runner was saved)"
    else:
        text = (
            "foundation-model checkpoint: an scGPT folder (args.json, vocab.json, best_model.pt), "
            "a Geneformer folder (config.json, model.safetensors and its dictionaries), or an "
            "official scGPT name such as 'whole-human' looked up in "
            f"$SCDLKIT_CACHE_DIR/scgpt/<name>/ (default: {default!r})"
        )
    parser.add_argument("--checkpoint", default=default, metavar="C", help=text)


def gene_layer_options(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
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


def device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA, then MPS, then CPU) or a torch device such as 'cpu' or 'cuda:1' "
        "(default: 'auto')",
    )


def precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="'auto' (bf16 autocast where the hardware runs bf16 natively: CUDA, CPUs with AMX "
        "or AVX512-BF16; fp32 elsewhere), 'fp32' or 'bf16' (default: 'auto')",
    )


def streaming_options(parser: argparse.ArgumentParser) -> None:
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
        type=positive_int,
        metavar="N",
        help="cells read, tokenised and run at a time (default: all cells in memory; 50000 with "
        "--backed); results do not depend on it in fp32",
    )


def output_option(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        required=required,
        metavar="OUT.h5ad",
        help=f"{what}; written atomically (temporary file beside it, then renamed); missing "
        "folders are created",
    )


def key_added_option(parser: argparse.ArgumentParser, default: str, slots: str) -> None:
    parser.add_argument(
        "--key-added", default=default, metavar="KEY", help=f"{slots} (default: {default!r})"
    )


def _number(text: str, kind: type, expected: str) -> float:
    """``text`` as a finite ``kind``, or an argparse error saying what is ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        msg = f"must be {expected}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _in_range(text: str, kind: type, expected: str, ok: Any) -> Any:
    value = _number(text, kind, expected)
    if not ok(value):
        msg = f"must be {expected}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (cells per batch, epochs, repeats)."""
    return _in_range(text, int, "a positive integer", lambda v: v >= 1)


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1], the range numpy and Lightning accept."""
    return _in_range(text, int, f"an integer in [0, {MAX_SEED}]", lambda v: 0 <= v <= MAX_SEED)


def positive_number(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    return _in_range(text, float, "a finite number > 0", lambda v: v > 0)


def fraction(text: str) -> float:
    """A number in [0, 1) (a share of cells, a dropout)."""
    return _in_range(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def unit_interval(text: str) -> float:
    """A number in [0, 1] (a probability)."""
    return _in_range(text, float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
