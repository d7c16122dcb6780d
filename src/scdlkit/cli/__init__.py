"""``scdlkit``: the command line over :mod:`scdlkit.tl`, for pipelines.

Sub-commands ``inspect``, ``embed``, ``adapt``, ``annotate`` and ``markers`` read an ``.h5ad``
file, run one tool and write the result atomically. ``scdlkit --help`` lists them; :func:`main`
runs them in-process and returns the exit code (0 success, 1 unexpected error, 2 usage or input
error).

The parts: ``_parser`` and ``_options`` (argparse), ``_checks`` (exit codes and the checks run
before any work), ``_commands`` (one function per sub-command), ``_io`` (reading the input and
the atomic writes), ``_distributed`` (torchrun process groups), ``_main`` (errors to exit codes).
Importing this package does not import torch.
"""

from __future__ import annotations

from scdlkit._shared.strategies import DEFAULT_STRATEGIES, STRATEGIES
from scdlkit.cli._checks import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    check_device,
    check_output,
    check_output_dir,
)
from scdlkit.cli._commands import run_adapt, run_annotate, run_embed, run_inspect, run_markers
from scdlkit.cli._io import atomic_path, read_input, write_h5ad_atomic, write_json_atomic
from scdlkit.cli._main import main
from scdlkit.cli._parser import PROG, build_parser

__all__ = [
    "DEFAULT_STRATEGIES",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "PROG",
    "STRATEGIES",
    "InputError",
    "atomic_path",
    "build_parser",
    "check_device",
    "check_output",
    "check_output_dir",
    "main",
    "read_input",
    "run_adapt",
    "run_annotate",
    "run_embed",
    "run_inspect",
    "run_markers",
    "write_h5ad_atomic",
    "write_json_atomic",
]
