"""Exit codes, the input-error type, and the checks that run before any work.

Every option that can be wrong (the device, where outputs go) is checked here, up front, so a
typo fails in a second with one line instead of after the model has run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "INPUT_ERRORS",
    "InputError",
    "check_device",
    "check_output",
    "check_output_dir",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """A problem with the command line's options or files (exit 2)."""


#: Errors that mean "the input or the options are wrong" (exit 2, no traceback unless -v).
INPUT_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

_DEVICE_HINT = "use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def check_device(text: str) -> str:
    """Refuse a ``--device`` that torch does not know or that this machine lacks.

    Parameters
    ----------
    text
        The option's value.

    Returns
    -------
    ``text`` unchanged.

    Raises
    ------
    InputError
        ``text`` is not a torch device string, or names a CUDA GPU or MPS device that is not
        available here.
    """
    if text == "auto":
        return text
    import torch  # here: 'scdlkit --help' and the usage errors never need torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        msg = f"--device {text!r} is not a device that torch knows; {_DEVICE_HINT}"
        raise InputError(msg) from err
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "" if torch.version.cuda else " (this torch is a CPU-only build)"
            msg = (
                f"--device {text!r}: no CUDA GPU is available here{build}; use --device cpu or auto"
            )
            raise InputError(msg)
        if device.index is not None and device.index >= n:
            msg = f"--device {text!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}"
            raise InputError(msg)
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            msg = f"--device {text!r}: Apple MPS is not available here; use --device cpu or auto"
            raise InputError(msg)
    return text


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()  # pragma: no cover - "/" always exists


def _check_writable_folder(folder: Path, what: str) -> None:
    """Create a probe file in ``folder`` (the only test that root, ACLs and read-only mounts
    all answer truthfully), then remove it."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".scdlkit-write-check.")
    except OSError as err:
        msg = (
            f"cannot write to the folder {str(folder)!r} of {what} ({err.strerror or err}); "
            "choose a writable place"
        )
        raise InputError(msg) from err
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def _check_parents_are_folders(path: Path, what: str) -> Path:
    """The closest existing ancestor of ``path``, refused unless it is a folder."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        msg = (
            f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a "
            "folder; choose another path or move that file away"
        )
        raise InputError(msg)
    return existing


def check_output(path: str | os.PathLike | None, *, what: str = "output") -> Path | None:
    """Refuse an output file that cannot be written; create its missing folders.

    Parameters
    ----------
    path
        The output file, or ``None`` (nothing to check).
    what
        How the error messages name it (``"output"``, ``"--json"``).

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path` (``None`` for ``None``).

    Raises
    ------
    InputError
        ``path`` is a folder, one of its parents is a file, or its folder is not writable.
    """
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        msg = f"{what} {str(path)!r} is a folder; expected a file name such as out.h5ad"
        raise InputError(msg)
    _check_parents_are_folders(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = (
            f"cannot create the folder {str(path.parent)!r} of {what} {str(path)!r} "
            f"({err.strerror or err}); choose a writable place"
        )
        raise InputError(msg) from err
    _check_writable_folder(path.parent, f"{what} {str(path)!r}")
    return path


def check_output_dir(path: Path, *, what: str = "--output-dir") -> Path:
    """Refuse an output folder that cannot be created or written, without creating it.

    Parameters
    ----------
    path
        The folder (it may not exist yet).
    what
        How the error messages name it.

    Returns
    -------
    ``path`` unchanged.

    Raises
    ------
    InputError
        ``path`` is a file, one of its parents is a file, or the closest existing folder is not
        writable.
    """
    if path.exists() and not path.is_dir():
        msg = f"{what} {str(path)!r} is a file; expected a folder (it is created if missing)"
        raise InputError(msg)
    existing = path if path.is_dir() else _check_parents_are_folders(path, what)
    _check_writable_folder(existing, f"{what} {str(path)!r}")
    return path
