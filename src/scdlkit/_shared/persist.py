"""Saving and loading folders safely: one atomic writer, a folder lock, hash-checked reading.

A saved folder (an annotation runner, a TaskRunner) is a ``manifest.json`` naming a
content-addressed weights file and its sha256. Every writer here works the same way:

- files are written under a temporary name (``.scdlkit-tmp-...``), flushed to disk and renamed
  into place, so a reader sees the old file or the complete new one, never a partial one;
- a save holds the folder's lock (``.scdlkit.lock``, an OS lock released when the process ends,
  even when killed); a second saver waits (up to :data:`SAVE_WAIT_SECONDS`, then
  :class:`FolderBusyError`), and a loader holds it shared while it reads the manifest and the
  weights. The lock is a regular file opened without following links and without blocking; a
  link, named pipe or device in its place is refused (:class:`UnsafeFileError`);
- a manifest never names a missing file: the weights are flushed under their content-addressed
  name before the manifest naming them is renamed into place, and weights are removed only after
  that, only those an earlier save wrote (``retained_weights``, sha256 checked) that neither the
  new nor the replaced manifest names. No other file of the folder is ever removed;
- temporary files and folders left by killed saves are removed by the next save to the folder.

Nothing is unpickled: manifests are JSON checked against a schema
(:class:`~scdlkit._shared.provenance.Field`, re-exported here).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdlkit._shared.provenance import Field, check_fields

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
    "UnsafeFileError",
    "atomic_file",
    "check_fields",
    "checked_weights_file",
    "claim_run_folder",
    "clean_leftovers",
    "folder_lock",
    "make_readable",
    "open_regular",
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
#: The names a save gives weights: ``weights-<first 16 hex digits of their sha256><suffix>``.
WEIGHTS_NAME = re.compile(r"weights-([0-9a-f]{16})\.(safetensors|pt)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: ``os.open`` flags: never follow a link, never wait on a pipe (0 where the OS lacks them).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class FolderBusyError(PermissionError):
    """Another process holds the folder's lock (it is saving there right now)."""


class UnsafeFileError(PermissionError):
    """A file scdlkit reads or writes is a link, pipe or device where a regular file belongs."""


class RunExistsError(FileExistsError, ValueError):
    """``output_dir`` already holds a run and ``overwrite`` was not given (a user error)."""


# ------------------------------------------------------------------------------ small helpers


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: Path) -> Any:
    """Open ``path`` for binary reading, refusing (never blocking on) a pipe or device.

    Raises
    ------
    UnsafeFileError
        ``path`` is a named pipe, device, socket or folder.
    """
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC | getattr(os, "O_BINARY", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        msg = (
            f"{path} is {_file_kind(mode)}, not a regular file; scdlkit does not read it. "
            "Replace it with the file it should be (copy the folder again)."
        )
        raise UnsafeFileError(msg)
    return os.fdopen(fd, "rb")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file, read in 1 MiB blocks (a pipe is refused, never waited on)."""
    digest = hashlib.sha256()
    with open_regular(Path(path)) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    """Flush a written file's content to disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the renames into it) to disk, where the OS supports it."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the renames are still atomic
        pass
    finally:
        os.close(fd)


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


def _pending_weights(name: str) -> str | None:
    """The weights name a save's pending marker (``...-pending-weights-<hex>.<suffix>``) names."""
    label = name[len(TMP_PREFIX) :].split("-", 3)[-1]
    if not label.startswith("pending-"):
        return None
    weights = label[len("pending-") :]
    return weights if WEIGHTS_NAME.fullmatch(weights) else None


def clean_leftovers(folder: Path) -> list[str]:
    """Remove temporary files and folders of killed saves (this host's dead processes only).

    Returns the names removed. Temporary names of live processes, and of other hosts (a shared
    file system), are left alone. A killed save's pending marker names the weights it had moved
    in before it could write the manifest naming them; those are removed too, unless the
    manifest names them now (their content must match their content-addressed name).
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
        orphan = _pending_weights(entry.name) if entry.name.startswith(TMP_PREFIX) else None
        if orphan is not None and orphan not in _generation(folder).names:
            digest_prefix = WEIGHTS_NAME.fullmatch(orphan).group(1)
            if _remove_written(Path(folder) / orphan, lambda d, p=digest_prefix: d[:16] == p):
                removed.append(orphan)
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
        time.sleep(0.005)
    return True


def _unsafe_lock(file: Path, what: str, *, shared: bool) -> UnsafeFileError:
    action = "read the folder under it" if shared else "write through it"
    msg = (
        f"{file} is {what}, not a regular lock file, so scdlkit will not {action}. Remove it "
        "(scdlkit creates a plain one on the next save) and try again."
    )
    return UnsafeFileError(msg)


def _open_lock(file: Path, *, shared: bool) -> int | None:
    """Open the lock file: a regular file, never through a link, never blocking on a pipe.

    Returns ``None`` for a reader when there is no lock file it may open (a folder saved before
    locks, or a read-only copy): it reads without one.
    """
    if not _NOFOLLOW and file.is_symlink():  # Windows: no O_NOFOLLOW
        raise _unsafe_lock(file, "a symbolic link", shared=shared)
    flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(file, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, 0o666)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) or file.is_symlink():
            raise _unsafe_lock(file, "a symbolic link", shared=shared) from err
        if file.is_dir():
            raise _unsafe_lock(file, "a folder", shared=shared) from err
        if shared:
            return None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = _file_kind(info.st_mode)
    elif not shared and info.st_nlink > 1:  # writing the holder's pid would change the others
        problem = f"a file with {info.st_nlink} hard links"
    if problem is not None:
        os.close(fd)
        raise _unsafe_lock(file, problem, shared=shared)
    return fd


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


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

    The lock file is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` and must be a regular file
    (for a writer, with no other hard link), so a lock planted as a link to another file, a
    named pipe or a device is refused at once: never written through, never waited on.

    Raises
    ------
    FolderBusyError
        The lock was not free in time; the message names the last writer (pid and host).
    UnsafeFileError
        ``.scdlkit.lock`` is a symbolic or hard link, a named pipe, a device or a folder.
    """
    file = Path(folder) / LOCK_NAME
    fd = _open_lock(file, shared=shared)
    if fd is None:
        yield
        return
    try:
        if not _acquire(fd, shared=shared, wait=SAVE_WAIT_SECONDS if shared else wait):
            msg = (
                f"{what} {str(folder)!r} is being written by another process (last writer: "
                f"{_lock_holder(fd)}). Wait for it to finish, or write to another folder."
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


@dataclass(frozen=True)
class _Generation:
    """What the folder's current manifest says about the weights saves wrote there."""

    current: dict[str, str] | None = None  # {"file", "sha256"} of the weights it names
    retained: tuple[dict[str, str], ...] = ()  # earlier weights a save wrote and kept

    @property
    def names(self) -> set[str]:
        return {e["file"] for e in (self.current, *self.retained) if e is not None}


def _written_entry(name: Any, digest: Any) -> dict[str, str] | None:
    """``{"file", "sha256"}`` when ``name`` is a weights name a save gives ``digest``, else None."""
    if not (isinstance(name, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)):
        return None
    match = WEIGHTS_NAME.fullmatch(name)
    if match is None or match.group(1) != digest[:16]:
        return None
    return {"file": name, "sha256": digest}


def _generation(folder: Path) -> _Generation:
    """The current manifest's weights and retained weights (empty when it cannot be read)."""
    try:
        with open_regular(Path(folder) / MANIFEST_NAME) as fh:
            record = json.loads(fh.read())
    except (OSError, ValueError):
        return _Generation()
    if not isinstance(record, dict):
        return _Generation()
    retained = record.get("retained_weights")
    entries = [
        _written_entry(e.get("file"), e.get("sha256"))
        for e in (retained if isinstance(retained, list) else [])
        if isinstance(e, dict)
    ]
    return _Generation(
        current=_written_entry(record.get("weights_file"), record.get("weights_sha256")),
        retained=tuple(e for e in entries if e is not None),
    )


def _next_generation(
    previous: _Generation, name: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(retained, stale)`` after a save of weights ``name`` replaces ``previous``.

    The weights the replaced manifest named are kept (a reader that has just read it still finds
    them); those it kept are stale, unless the new manifest names them.
    """
    current = previous.current
    if current is None or current["file"] == name:
        return [e for e in previous.retained if e["file"] != name], []
    stale = [e for e in previous.retained if e["file"] not in {name, current["file"]}]
    return [current], stale


def _remove_written(file: Path, matches: Callable[[str], bool]) -> bool:
    """Remove ``file`` when it is a regular file whose sha256 ``matches``: one a save wrote."""
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode) or not matches(sha256_file(file)):
            return False
        file.unlink()
    except OSError:
        return False
    return True


def _with_retained(text: str, retained: list[dict[str, str]]) -> str:
    """The manifest text with ``retained_weights`` set: the weights saves wrote and still keep."""
    record = json.loads(text)
    if not isinstance(record, dict):
        msg = "render_manifest must return the JSON text of an object"
        raise TypeError(msg)
    record["retained_weights"] = retained
    return json.dumps(record, indent=2, allow_nan=False)


def save_weights_folder(
    folder: Path,
    write_weights: Callable[[Path], str],
    render_manifest: Callable[[str, str], str],
    *,
    what: str = "runner folder",
) -> str:
    """Save a weights file and the manifest naming it into ``folder``; the one folder writer.

    Under the folder's lock: the weights are flushed under their content-addressed name, then
    the manifest is renamed into place, then stale weights are removed: those an earlier save
    wrote (in the replaced manifest's ``retained_weights``, still holding that sha256) that
    neither manifest names. So the folder's manifest always names weights that are there.

    Parameters
    ----------
    folder
        Created if needed.
    write_weights
        Writes the weights to the path it is given; returns the suffix of the format used
        (``".safetensors"`` or ``".pt"``).
    render_manifest
        ``(weights_file, weights_sha256) -> manifest JSON text`` (an object); the writer adds
        its ``retained_weights`` field.
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
        previous = _generation(folder)
        tmp = folder / _tmp_name("weights")
        marker = None
        try:
            suffix = write_weights(tmp)
            _fsync_file(tmp)
            digest = sha256_file(tmp)
            name = f"weights-{digest[:16]}{suffix}"
            retained, stale = _next_generation(previous, name)
            text = _with_retained(render_manifest(name, digest), retained)
            fresh = name not in previous.names
            if fresh:  # a save killed before its manifest is written leaves this for the next
                marker = folder / _tmp_name(f"pending-{name}")
                marker.touch()
            make_readable(tmp)
            os.replace(tmp, folder / name)
            _fsync_dir(folder)
            try:
                write_text_atomic(folder / MANIFEST_NAME, text)
            except BaseException:
                if fresh and name not in _generation(folder).names:
                    (folder / name).unlink(missing_ok=True)
                raise
            _fsync_dir(folder)
        finally:
            tmp.unlink(missing_ok=True)
            if marker is not None:
                marker.unlink(missing_ok=True)
        for entry in stale:
            _remove_written(folder / entry["file"], lambda d, e=entry: d == e["sha256"])
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
    if not os.path.lexists(file):
        msg = f"{path} is not a saved {what}: {MANIFEST_NAME} is missing."
        raise FileNotFoundError(msg)
    with open_regular(file) as fh:  # a pipe planted as the manifest is refused, not waited on
        raw = fh.read()
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
    if not os.path.lexists(file):
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
