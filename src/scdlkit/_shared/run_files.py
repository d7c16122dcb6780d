"""The files a fitted runner leaves in ``output_dir`` besides itself, written by registered writers.

The model layer knows no ``obs``/``uns`` key names and draws nothing (DESIGN section 2), yet a
runner fitted with ``output_dir`` leaves tables, a report and figures there. So the runner calls
whatever is registered here, in a staging folder it publishes once they are done; the package
root (``scdlkit/__init__.py``, run before any sub-package) registers the writer of the report and
figures, which lives above the model layer (``scdlkit._artifacts``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunWriter", "register_run_writer", "run_file_names", "write_run_files"]


@dataclass(frozen=True)
class RunWriter:
    """One writer: ``write(runner, folder)`` and the names of the files it may leave there."""

    write: Callable[[Any, Path], None]
    files: tuple[str, ...]


_WRITERS: dict[str, RunWriter] = {}


def register_run_writer(
    name: str, write: Callable[[Any, Path], None], files: tuple[str, ...]
) -> None:
    """Call ``write(runner, folder)`` whenever a runner fitted with ``output_dir`` publishes.

    ``files`` are the names it writes that mark a folder as holding a run (a later run refuses
    such a folder unless told to overwrite it). Registering a name again replaces its writer.
    """
    _WRITERS[name] = RunWriter(write=write, files=tuple(files))


def run_file_names() -> tuple[str, ...]:
    """Every file name a registered writer may leave in a run folder."""
    return tuple(name for writer in _WRITERS.values() for name in writer.files)


def write_run_files(runner: Any, folder: Path) -> None:
    """Run every registered writer on ``folder``, in the order they were registered."""
    for writer in _WRITERS.values():
        writer.write(runner, folder)
