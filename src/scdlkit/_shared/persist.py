"""Saving and loading folders safely: one atomic writer, a folder lock, hash-checked reading.

A saved folder (an annotation runner, a TaskRunner) is a ``manifest.json`` naming a
content-addressed weights file and its sha256. Every writer here works the same way:

- files are written beside their final name under a temporary name (``.scdlkit-tmp-...``) and
  renamed into place, so a reader sees the old file or the complete new one, never a partial one;
- a save holds the folder's lock (``.scdlkit.lock``, an OS lock released when the process ends,
  even when it is killed); a second process saving to the same folder waits for it (up to
  :data:`SAVE_WAIT_SECONDS`, then :class:`FolderBusyError`) instead of racing, and a loader holds
  the lock shared while it reads the manifest and the weights, so they always belong together;
- a save keeps the weights the replaced manifest named (one generation back), so a reader that
  has just read the old manifest still finds its file; older weights are removed;
- temporary files and folders left by killed saves are removed by the next save to the folder.

Nothing is unpickled: manifests are JSON, checked field by field against a schema
(:class:`Field`, :func:`check_fields`) whose errors name the file, the field and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is only needed to read weights; `scdlkit --help` stays light
    import torch

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "RUN_MARKER",
    "TMP_PREFIX",
    "SAVE_WAIT_SECONDS",
    "RunExistsError",
    "Field",
    "FolderBusyError",
    "atomic_file",
    "check_fields",
    "checked_weights_file",
    "claim_run_folder",
    "clean_leftovers",
    "folder_lock",
    "make_readable",
    "prepare_folder",
    "publish_files",
    "read_checked_weights",
    "read_manifest_file",
    "read_manifest_with_digest",
    "save_weights_folder",
    "sha256_file",
    "write_text_atomic",
]

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".scdlkit.lock"
TMP_PREFIX = ".scdlkit-tmp-"
#: Written last into a run's ``output_dir``: the run finished and its files belong together.
RUN_MARKER = "run_complete.json"
_WEIGHT_SUFFIXES = (".safetensors", ".pt")


class FolderBusyError(PermissionError):
    """Another process holds the folder's lock (it is saving there right now)."""


class RunExistsError(FileExistsError, ValueError):
    """``output_dir`` already holds a run and ``overwrite`` was not given (a user error)."""


# ------------------------------------------------------------------------------ small helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(file: Path) -> None:
    """Ordinary file permissions (some writers create 0600 files), so shared folders work."""
    umask = os.umask(0)
    os.umask(umask)
    Path(file).chmod(0o666 & ~umask)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_name(label: str) -> str:
    """``.scdlkit-tmp-<host>-<pid>-<random>-<label>``: whose it is, so leftovers can be told."""
    return f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}-{label}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but not ours, or the OS cannot tell
        return True
    return True


def _leftover_owner(name: str) -> tuple[str | None, int] | None:
    """``(host tag, pid)`` of a temporary name, ``None`` for other names.

    Also recognises the names of saves before this scheme (``.weights-<pid>.tmp``,
    ``.manifest.json.<pid>.tmp``), which carry no host tag.
    """
    if name.startswith(TMP_PREFIX):
        parts = name[len(TMP_PREFIX) :].split("-", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return parts[0], int(parts[1])
        return None
    for prefix in (".weights-", f".{MANIFEST_NAME}."):
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix) : -len(".tmp")]
            if pid.isdigit():
                return None, int(pid)
    return None


def clean_leftovers(folder: Path) -> list[str]:
    """Remove temporary files and folders of killed saves (this host's dead processes only).

    Returns the names removed. Temporary names of live processes, and of other hosts (a shared
    file system), are left alone.
    """
    removed = []
    host = _host_tag()
    for entry in Path(folder).iterdir():
        owner = _leftover_owner(entry.name)
        if owner is None or owner[0] not in (None, host) or _pid_alive(owner[1]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


# -------------------------------------------------------------------------- folders and locks


def prepare_folder(folder: str | os.PathLike, *, what: str) -> Path:
    """Create ``folder`` if needed and prove it is writable; nothing else is left in it.

    Raises
    ------
    NotADirectoryError
        ``folder`` or one of its parents is a file.
    PermissionError
        The folder cannot be created or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        msg = f"{what} {str(folder)!r} is a file; pass a folder (it is created if missing)."
        raise NotADirectoryError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        msg = (
            f"{what} {str(folder)!r} cannot be created: a part of its path is a file "
            f"({err.filename}); choose another folder."
        )
        raise NotADirectoryError(msg) from err
    except OSError as err:
        msg = (
            f"{what} {str(folder)!r} cannot be created ({err.strerror or err}); "
            "choose a writable folder."
        )
        raise PermissionError(msg) from err
    probe = folder / _tmp_name("probe")
    try:
        probe.write_bytes(b"")
    except OSError as err:
        msg = f"{what} {str(folder)!r} is not writable ({err.strerror or err}); choose another."
        raise PermissionError(msg) from err
    finally:
        probe.unlink(missing_ok=True)
    return folder


#: How long a save waits for the folder's lock (readers hold it for a moment; another save for
#: as long as it writes) before giving up with :class:`FolderBusyError`.
SAVE_WAIT_SECONDS = 30.0


def _try_lock(fd: int, *, shared: bool) -> bool:
    """Take an OS lock on ``fd`` without blocking; ``False`` when a conflicting one is held."""
    try:
        import fcntl
    except ImportError:  # Windows: exclusive byte-range locks only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(fd: int, *, shared: bool, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while not _try_lock(fd, shared=shared):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def folder_lock(
    folder: Path, *, what: str = "folder", shared: bool = False, wait: float = 0.0
) -> Iterator[None]:
    """Hold ``folder/.scdlkit.lock`` for the block: exclusive to write, shared to read.

    A writer waits up to ``wait`` seconds for other holders, then fails; readers (``shared``)
    wait for a save in progress, so the manifest and the weights they read belong together. The
    OS releases the lock when the process ends, however it ends, so a killed save never leaves
    the folder locked; the lock file itself stays (removing it would race). A reader of a folder
    without a lock file (read-only, or saved before locks) reads without one.

    Raises
    ------
    FolderBusyError
        The lock was not free in time; the message names the last writer (pid and host).
    """
    file = Path(folder) / LOCK_NAME
    try:
        fd = os.open(file, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        if not _acquire(fd, shared=shared, wait=SAVE_WAIT_SECONDS if shared else wait):
            try:
                holder = Path(file).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            msg = (
                f"{what} {str(folder)!r} is being written by another process (last writer: "
                f"{holder}). Wait for it to finish, or write to another folder."
            )
            raise FolderBusyError(msg)
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary file keeps ``path``'s suffix (writers such as ``write_h5ad`` look at it) and
    is removed when the block fails, so ``path`` is either the old file or the complete new one.
    It gets the usual permissions (umask), not 0600.
    """
    path = Path(path)
    tmp = path.parent / (_tmp_name(path.name) + path.suffix)
    try:
        yield tmp
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)`` through :func:`atomic_file`, flushed to disk before the rename."""
    with atomic_file(path) as tmp, tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _named_weights(folder: Path) -> str | None:
    """The weights file the folder's current manifest names, if it can be read."""
    try:
        name = json.loads((folder / MANIFEST_NAME).read_text()).get("weights_file")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def save_weights_folder(
    folder: Path,
    write_weights: Callable[[Path], str],
    render_manifest: Callable[[str, str], str],
    *,
    what: str = "runner folder",
) -> str:
    """Save a weights file and the manifest naming it into ``folder``; the one folder writer.

    Parameters
    ----------
    folder
        Created if needed.
    write_weights
        Writes the weights to the path it is given; returns the suffix of the format used
        (``".safetensors"`` or ``".pt"``).
    render_manifest
        ``(weights_file, weights_sha256) -> manifest JSON text``.
    what
        How errors name the folder.

    Returns
    -------
    str
        The sha256 of the manifest written (it carries the weights' sha256).
    """
    folder = prepare_folder(folder, what=what)
    with folder_lock(folder, what=what, wait=SAVE_WAIT_SECONDS):
        clean_leftovers(folder)
        previous = _named_weights(folder)
        tmp = folder / _tmp_name("weights")
        try:
            suffix = write_weights(tmp)
            digest = sha256_file(tmp)
            weights_name = f"weights-{digest[:16]}{suffix}"
            make_readable(tmp)
            os.replace(tmp, folder / weights_name)
        finally:
            tmp.unlink(missing_ok=True)
        text = render_manifest(weights_name, digest)
        write_text_atomic(folder / MANIFEST_NAME, text)
        keep = {weights_name, previous}
        for stale in folder.glob("weights-*"):
            if stale.suffix in _WEIGHT_SUFFIXES and stale.name not in keep:
                stale.unlink(missing_ok=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------- run folders


@contextlib.contextmanager
def claim_run_folder(
    output_dir: Path, *, overwrite: bool, run_files: Sequence[str]
) -> Iterator[Path]:
    """Hold ``output_dir`` for one run, checked before any work.

    The folder is created and proven writable, locked for the run (a second run into it fails at
    once with :class:`FolderBusyError`), cleaned of leftovers of killed runs, and refused when
    it already holds a run (the completion marker or any of ``run_files``) unless ``overwrite``.
    :class:`RunExistsError` is both a ``FileExistsError`` and a ``ValueError``.
    With ``overwrite`` the old marker is removed first, so a run killed before it finishes is
    never taken for a complete one.
    """
    output_dir = prepare_folder(output_dir, what="output_dir")
    with folder_lock(output_dir, what="output_dir"):
        clean_leftovers(output_dir)
        found = [n for n in (RUN_MARKER, *run_files) if (output_dir / n).exists()]
        if found and not overwrite:
            msg = (
                f"output_dir {str(output_dir)!r} already holds a run ({', '.join(found)}). "
                "Pass overwrite=True (scdlkit adapt --overwrite) to replace it, or choose a fresh "
                "output_dir."
            )
            raise RunExistsError(msg)
        (output_dir / RUN_MARKER).unlink(missing_ok=True)
        yield output_dir


def publish_files(
    output_dir: Path, write: Callable[[Path], Any], *, marker: Mapping[str, Any]
) -> list[str]:
    """Write a run's files beside ``output_dir``'s, move them in, then write the marker.

    ``write(staging)`` writes the files into a temporary folder inside ``output_dir``; each is
    then renamed into place and :data:`RUN_MARKER` (``marker`` plus the file names) is written
    last. A run killed before the marker leaves no marker, and its staging folder is removed by
    the next run. Returns the names moved in.
    """
    staging = output_dir / _tmp_name("staging")
    staging.mkdir()
    try:
        write(staging)
        (output_dir / RUN_MARKER).unlink(missing_ok=True)
        names = sorted(entry.name for entry in staging.iterdir())
        for name in names:
            target = output_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        record = {**marker, "files": names}
        write_text_atomic(output_dir / RUN_MARKER, json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Field:
    """One manifest field: its JSON types, whether it must be present, and a value check.

    ``check(value)`` returns ``None`` when the value is fine, else what is wrong with it
    (``"must be at least 1"``). ``bool`` is accepted only where listed in ``types`` (JSON
    ``true`` is not a number here), and ``int`` wherever ``float`` is.
    """

    name: str
    types: tuple[type, ...]
    required: bool = True
    check: Callable[[Any], str | None] | None = None


def _type_names(types: tuple[type, ...]) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        type(None): "null",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check_fields(file: Path, data: Mapping[str, Any], fields: Sequence[Field], *, fix: str) -> None:
    """Check every field of ``data`` against ``fields``; the first problem is a ValueError.

    The message names ``file``, the field, what is wrong and ``fix``.
    """
    for spec in fields:
        if spec.name not in data:
            if spec.required:
                msg = f"{file}: field {spec.name!r} is missing; {fix}."
                raise ValueError(msg)
            continue
        value = data[spec.name]
        if not _has_type(value, spec.types):
            msg = (
                f"{file}: field {spec.name!r} must be {_type_names(spec.types)}, "
                f"not {type(value).__name__} ({_short(value)}); {fix}."
            )
            raise ValueError(msg)
        problem = None if spec.check is None or value is None else spec.check(value)
        if problem:
            msg = f"{file}: field {spec.name!r} {problem}; {fix}."
            raise ValueError(msg)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_manifest_with_digest(
    path: Path,
    required: dict[str, type] | Sequence[Field],
    *,
    schema_version: int,
    what: str,
    kind: str | None = None,
    fix: str = "save it again with this scdlkit",
) -> tuple[dict[str, Any], str]:
    """Parse ``path/manifest.json``, check it, and return it with the sha256 of the bytes read.

    ``required`` is a schema (:class:`Field` list) or, for short, ``{name: JSON type}``; ``kind``
    is compared with the manifest's; ``what`` names the saved object in errors. The digest is of
    the very bytes parsed, so it names exactly the manifest used.
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        msg = f"{path} is not a saved {what}: {MANIFEST_NAME} is missing."
        raise FileNotFoundError(msg)
    raw = file.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{file} is not valid JSON ({err}); {fix}."
        raise ValueError(msg) from err
    if not isinstance(manifest, dict):
        msg = f"{file} must hold a JSON object, not {type(manifest).__name__}; {fix}."
        raise ValueError(msg)
    head = [
        Field("schema_version", (int,)),
        Field("kind", (str,)),
    ]
    check_fields(file, manifest, head, fix=fix)
    if kind is not None and manifest["kind"] != kind:
        msg = (
            f"{file}: field 'kind' is {manifest['kind']!r}, not {kind!r}: this folder holds "
            f"another kind of saved object; load it with its own class."
        )
        raise ValueError(msg)
    if manifest["schema_version"] != schema_version:
        msg = (
            f"{file}: field 'schema_version' is {manifest['schema_version']}; this scdlkit reads "
            f"version {schema_version}. Save it again with a matching scdlkit."
        )
        raise ValueError(msg)
    fields = (
        [Field(name, (kind_of,)) for name, kind_of in required.items()]
        if isinstance(required, Mapping)
        else list(required)
    )
    check_fields(file, manifest, fields, fix=fix)
    return manifest, hashlib.sha256(raw).hexdigest()


def read_manifest_file(
    path: Path,
    required: dict[str, type] | Sequence[Field],
    *,
    schema_version: int,
    what: str,
    kind: str | None = None,
) -> dict[str, Any]:
    """:func:`read_manifest_with_digest` without the digest."""
    return read_manifest_with_digest(
        path, required, schema_version=schema_version, what=what, kind=kind
    )[0]


def checked_weights_file(path: Path, manifest: dict[str, Any]) -> Path:
    """The weights file the manifest names, refused when missing or changed since saving."""
    file = path / manifest["weights_file"]
    if not file.is_file():
        msg = f"{file} is missing; the runner folder is incomplete."
        raise FileNotFoundError(msg)
    if sha256_file(file) != manifest["weights_sha256"]:
        msg = (
            f"{file} does not match the sha256 recorded in {MANIFEST_NAME}: the weights were "
            "changed after saving. Refusing to load them."
        )
        raise ValueError(msg)
    return file


def read_checked_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The safetensors file the manifest names, refused unless its sha256 matches the record."""
    # safetensors is the foundation extra's: imported where it is needed
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = checked_weights_file(path, manifest)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:  # the hash matched a file that is not safetensors
        msg = f"{file} is not a safetensors file ({err})."
        raise ValueError(msg) from err
