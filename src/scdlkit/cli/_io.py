"""Reading the input ``.h5ad`` and writing results atomically (never a partial file)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scdlkit._shared.persist import atomic_file, clean_leftovers
from scdlkit.cli._checks import InputError

__all__ = [
    "atomic_path",
    "read_input",
    "write_result",
    "write_backed_atomic",
    "write_h5ad_atomic",
    "write_json_atomic",
]

logger = logging.getLogger("scdlkit")


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
    import anndata as ad  # here: slow to import, and 'scdlkit --help' never reads data

    logger.info("reading %s", path)
    try:
        return ad.read_h5ad(path, backed="r") if backed else ad.read_h5ad(path)
    except Exception as err:  # h5py raises bare OSError for non-HDF5 files
        msg = f"cannot read {str(path)!r} as an .h5ad file: {err}"
        raise InputError(msg) from err


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The one atomic writer of :mod:`scdlkit._shared.persist` (:func:`~scdlkit._shared.persist.
    atomic_file`): the temporary file is removed when the block fails, so ``path`` is either the
    old file or the complete new one, never a partial write; leftovers of a killed command are
    removed by the next one writing to the same folder. Every file the command line writes goes
    through here.
    """
    clean_leftovers(path.parent)
    with atomic_file(path) as tmp:
        yield tmp


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
    # here: only --backed output needs them; keeps 'scdlkit --help' fast
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


def write_result(adata: Any, *, source: Path, path: Path, backed: bool) -> None:
    """Write an embedded or annotated AnnData: streamed from ``source`` when it is backed."""
    if backed:
        write_backed_atomic(adata, source, path)
    else:
        write_h5ad_atomic(adata, path)


def write_json_atomic(data: Any, path: Path) -> None:
    """JSON (numpy values as plain numbers and lists) through :func:`atomic_path`."""

    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=plain) + "\n")
