"""``main``: parse, set up logging, run one sub-command, and turn errors into exit codes.

User errors (bad options or files, unusable data) exit 2 with one line on stderr; anything else
is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from scdlkit.cli._checks import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, INPUT_ERRORS
from scdlkit.cli._parser import PROG, build_parser

__all__ = ["main"]

logger = logging.getLogger("scdlkit")


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
    """The error's message on one line."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])  # str(KeyError) adds quotes
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scdlkit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    The exit code: 0 success, 1 unexpected error (a bug, printed with its traceback), 2 usage
    or input error (one line saying what to fix; also when ``inspect`` finds blocking
    problems), 130 when interrupted.

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
