"""Reading Geneformer's four pickled dictionaries without running pickled code.

Upstream ships its gene dictionaries as pickles, and unpickling runs whatever code a file names.
Here a restricted unpickler admits exactly the globals those files use (numpy scalars and their
dtype) and refuses any other; the result is converted to plain Python and cached as JSON, keyed by
the pickle's sha256, so later loads read JSON only.

The four kinds (GENEFORMER_NOTES.md section 2):

- token dictionary ``{Ensembl id or special: token id}`` (``<pad>``, ``<mask>``; V2 adds ``<cls>``,
  ``<eos>``);
- gene median dictionary ``{Ensembl id: non-zero median}``;
- gene name dictionary ``{symbol: Ensembl id}``;
- Ensembl mapping dictionary ``{id or alias: Ensembl id}`` (absent from the oldest V1 releases).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from scdlkit._shared.cache import default_cache_dir

__all__ = [
    "DICTIONARY_KINDS",
    "SPECIAL_TOKENS",
    "GeneformerDictionaries",
    "find_dictionary_files",
    "load_geneformer_dictionaries",
    "read_dictionary",
]

logger = logging.getLogger("scdlkit")

#: File-name prefix of each dictionary kind; upstream appends a corpus tag (``_gc104M``, ``_gc30M``,
#: ``_gc95M``) or nothing (the 2023 V1 release).
DICTIONARY_KINDS: dict[str, str] = {
    "token": "token_dictionary",
    "median": "gene_median_dictionary",
    "name_id": "gene_name_id_dict",
    "mapping": "ensembl_mapping_dict",
}
REQUIRED_KINDS = ("token", "median")
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
#: Version of the JSON cache layout; a cache file of another version is ignored and rewritten.
CACHE_SCHEMA = 1

_SCALAR_GLOBALS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
_DTYPE_GLOBAL = ("numpy", "dtype")
#: numpy dtype kinds a dictionary value may have: bool, integers, floats, strings.
_PLAIN_KINDS = frozenset("biufUS")


class _UnsafePickle(pickle.UnpicklingError):
    """A dictionary pickle asked for something other than a numpy scalar."""


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(spec, align, copy)`` for a plain (non-object) dtype named by a string."""
    if not isinstance(spec, str):
        msg = f"numpy.dtype({spec!r}) is not a plain dtype name"
        raise _UnsafePickle(msg)
    try:
        dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    except TypeError as err:
        msg = f"numpy.dtype({spec!r}) is not a dtype"
        raise _UnsafePickle(msg) from err
    if dtype.kind not in _PLAIN_KINDS:
        msg = f"numpy.dtype({spec!r}) is not a number or string dtype"
        raise _UnsafePickle(msg)
    return dtype


def _safe_scalar(dtype: Any, data: Any = None) -> np.generic:
    """A numpy scalar from its raw bytes, as ``numpy.core.multiarray.scalar`` builds it."""
    if (
        not isinstance(dtype, np.dtype)
        or dtype.kind not in _PLAIN_KINDS
        or not isinstance(data, bytes)
        or len(data) != dtype.itemsize
    ):
        msg = f"numpy scalar of dtype {dtype!r} from {type(data).__name__} is not a plain number"
        raise _UnsafePickle(msg)
    return np.frombuffer(data, dtype=dtype)[0]


class _DictionaryUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy scalar and dtype globals, to safe rebuilders."""

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if (module, name) in _SCALAR_GLOBALS:
            return _safe_scalar
        if (module, name) == _DTYPE_GLOBAL:
            return _safe_dtype
        msg = f"the global {module}.{name}"
        raise _UnsafePickle(msg)


def _unpickle(raw: bytes, path: Path) -> Any:
    try:
        return _DictionaryUnpickler(io.BytesIO(raw)).load()
    except _UnsafePickle as err:
        msg = (
            f"{path} was not loaded: it asks for {err}, and a Geneformer dictionary holds only "
            "strings and numbers (numpy scalars). Unpickling it could run code; use the "
            "dictionary files released with the Geneformer checkpoint."
        )
        raise ValueError(msg) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        msg = (
            f"{path} is not a readable pickled dictionary ({type(err).__name__}: {err}); it is "
            "probably truncated or not a Geneformer dictionary. Copy the file again."
        )
        raise ValueError(msg) from err


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _convert(obj: Any, kind: str, path: Path) -> dict[str, Any]:
    """Plain ``{str: int | float | str}`` from an unpickled dictionary; refuse other shapes."""
    if not isinstance(obj, dict):
        msg = f"{path} holds a {type(obj).__name__}, not a dictionary; is it a Geneformer file?"
        raise ValueError(msg)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        key, value = _plain(key), _plain(value)
        if not isinstance(key, str):
            msg = f"{path}: key {key!r} is not a string; is it a Geneformer {kind} dictionary?"
            raise ValueError(msg)
        if kind == "token":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif kind == "median":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
            ok = ok and np.isfinite(value) and value > 0
        else:
            if value is None:  # an unmapped entry can never reach a token
                continue
            ok = isinstance(value, str)
        if not ok:
            expected = {
                "token": "a non-negative integer token id",
                "median": "a positive finite number",
            }.get(kind, "an Ensembl id (string)")
            msg = f"{path}: the value of {key!r} is {value!r}, not {expected}."
            raise ValueError(msg)
        out[key] = value
    if kind == "token":
        ids = sorted(out.values())
        if ids != list(range(len(ids))):
            msg = f"{path}: token ids must be 0..{len(ids) - 1}, each once."
            raise ValueError(msg)
        if "<pad>" not in out:
            msg = f"{path} has no '<pad>' token; is it a Geneformer token dictionary?"
            raise ValueError(msg)
    return out


def _cache_file(digest: str) -> Path:
    return default_cache_dir() / "geneformer" / "dictionaries" / f"{digest}.json"


def _read_cache(file: Path, kind: str) -> dict[str, Any] | None:
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(cached, dict)
        or cached.get("schema") != CACHE_SCHEMA
        or cached.get("kind") != kind
        or not isinstance(cached.get("data"), dict)
    ):
        return None
    return cached["data"]


def _write_cache(file: Path, kind: str, source: Path, data: dict[str, Any]) -> None:
    payload = {"schema": CACHE_SCHEMA, "kind": kind, "source": source.name, "data": data}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        # written beside and renamed: a reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        os.replace(tmp, file)
    except OSError as err:  # a read-only cache only costs the next load an unpickling
        logger.debug("could not cache %s as JSON in %s: %s", source, file.parent, err)


def read_dictionary(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], str]:
    """Read one pickled Geneformer dictionary safely, through the JSON cache.

    Parameters
    ----------
    path
        The ``.pkl`` file.
    kind
        One of :data:`DICTIONARY_KINDS`: ``"token"``, ``"median"``, ``"name_id"``, ``"mapping"``;
        it decides how values are checked and converted.

    Returns
    -------
    data : dict
        Plain Python: ``{str: int}`` (token), ``{str: float}`` (median), ``{str: str}`` (the
        others; entries mapped to ``None`` are left out).
    sha256 : str
        sha256 of the pickle's bytes (the cache key).

    Raises
    ------
    ValueError
        When the pickle names any global other than ``numpy.core.multiarray.scalar``,
        ``numpy._core.multiarray.scalar`` or ``numpy.dtype`` (nothing in it is run), is not a
        readable pickle, or does not hold a dictionary of the expected types.

    Examples
    --------
    >>> tokens, digest = read_dictionary("token_dictionary_gc104M.pkl", "token")  # doctest: +SKIP
    >>> tokens["<cls>"]  # doctest: +SKIP
    2
    """
    if kind not in DICTIONARY_KINDS:
        msg = (
            f"kind={kind!r} is not a dictionary kind; choose one of {', '.join(DICTIONARY_KINDS)}."
        )
        raise ValueError(msg)
    path = Path(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    cache = _cache_file(digest)
    data = _read_cache(cache, kind)
    if data is None:
        data = _convert(_unpickle(raw, path), kind, path)
        _write_cache(cache, kind, path, data)
    return data, digest


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The dictionaries that turn genes into Geneformer tokens, as plain Python.

    Attributes
    ----------
    token_ids
        ``{Ensembl id or special token: token id}``.
    medians
        ``{Ensembl id: non-zero median expression}`` over the pretraining corpus.
    gene_name_id
        ``{gene symbol: Ensembl id}`` (empty when no such file was found).
    mapping
        ``{Ensembl id, retired id or (V2) upper-cased symbol: Ensembl id}``; ``None`` when no
        mapping file was found, in which case upstream maps each token gene to itself.
    files
        ``{kind: path}`` of the files read.
    sha256
        ``{kind: sha256 of the pickle}``; saved runners pin these.
    """

    token_ids: dict[str, int] = field(repr=False)
    medians: dict[str, float] = field(repr=False)
    gene_name_id: dict[str, str] = field(default_factory=dict, repr=False)
    mapping: dict[str, str] | None = field(default=None, repr=False)
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [g for g in self.token_ids if g not in SPECIAL_TOKENS and g not in self.medians]
        if missing:
            where = self.files.get("median", "the median dictionary")
            msg = (
                f"{where} lacks the median of {len(missing)} token genes (first: "
                f"{', '.join(missing[:3])}); use the median and token dictionaries released "
                "together."
            )
            raise ValueError(msg)

    @property
    def n_tokens(self) -> int:
        """Size of the token dictionary, specials included (the model's ``vocab_size``)."""
        return len(self.token_ids)

    @property
    def pad_id(self) -> int:
        """Token id of ``<pad>``."""
        return self.token_ids["<pad>"]

    @property
    def mask_id(self) -> int | None:
        """Token id of ``<mask>``, or ``None``."""
        return self.token_ids.get("<mask>")

    @property
    def cls_id(self) -> int | None:
        """Token id of ``<cls>``; ``None`` for V1 dictionaries."""
        return self.token_ids.get("<cls>")

    @property
    def eos_id(self) -> int | None:
        """Token id of ``<eos>``; ``None`` for V1 dictionaries."""
        return self.token_ids.get("<eos>")

    @property
    def version(self) -> str:
        """``"V2"`` when the token dictionary holds ``<cls>`` and ``<eos>``, else ``"V1"``."""
        return "V2" if self.cls_id is not None and self.eos_id is not None else "V1"

    @cached_property
    def gene_mapping(self) -> dict[str, str]:
        """The mapping restricted to targets that are token genes, as upstream restricts it.

        Without a mapping file, each token gene maps to itself (upstream's fallback; the special
        tokens are left out, no gene is named ``<cls>``).
        """
        genes = {g for g in self.token_ids if g not in SPECIAL_TOKENS}
        if self.mapping is None:
            return {g: g for g in genes}
        return {k: v for k, v in self.mapping.items() if v in genes}


def find_dictionary_files(folder: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """Dictionary files in ``folder``, grouped into sets by their corpus tag.

    Parameters
    ----------
    folder
        A folder that may hold ``token_dictionary*.pkl``, ``gene_median_dictionary*.pkl``,
        ``gene_name_id_dict*.pkl`` and ``ensembl_mapping_dict*.pkl``.

    Returns
    -------
    dict
        ``{tag: {kind: path}}``, e.g. ``{"_gc104M": {"token": ..., "median": ...}}``; only sets
        holding at least a token and a median dictionary, sorted by tag.
    """
    folder = Path(folder)
    sets: dict[str, dict[str, Path]] = {}
    if not folder.is_dir():
        return {}
    for file in sorted(folder.glob("*.pkl")):
        for kind, prefix in DICTIONARY_KINDS.items():
            if file.stem.startswith(prefix):
                sets.setdefault(file.stem[len(prefix) :], {})[kind] = file
    return {tag: files for tag, files in sorted(sets.items()) if set(REQUIRED_KINDS) <= set(files)}


def load_geneformer_dictionaries(
    files: str | os.PathLike | dict[str, str | os.PathLike],
) -> GeneformerDictionaries:
    """Read a set of Geneformer dictionaries (safely; see :func:`read_dictionary`).

    Parameters
    ----------
    files
        A folder holding exactly one set of dictionary files (e.g. upstream's ``geneformer/``
        for V2, ``geneformer/gene_dictionaries_30m/`` for V1), or ``{kind: path}`` with kinds
        ``"token"`` and ``"median"`` (required), ``"name_id"`` and ``"mapping"`` (optional).

    Returns
    -------
    GeneformerDictionaries
        The converted dictionaries with their files and hashes.

    Raises
    ------
    FileNotFoundError
        When the folder holds no token and median dictionary, or a given file does not exist.
    ValueError
        When the folder holds several sets (name the files), a kind is unknown, or a file is
        refused by :func:`read_dictionary`.

    Examples
    --------
    >>> dicts = load_geneformer_dictionaries("Geneformer/geneformer")  # doctest: +SKIP
    >>> dicts.version, dicts.n_tokens  # doctest: +SKIP
    ('V2', 20275)
    """
    if isinstance(files, dict):
        unknown = sorted(set(files) - set(DICTIONARY_KINDS))
        if unknown:
            msg = (
                f"unknown dictionary kind(s) {', '.join(map(repr, unknown))}; use "
                f"{', '.join(map(repr, DICTIONARY_KINDS))}."
            )
            raise ValueError(msg)
        paths = {kind: Path(p) for kind, p in files.items()}
        missing = [k for k in REQUIRED_KINDS if k not in paths]
        if missing:
            msg = f"dictionary files for {', '.join(missing)} are required (got {sorted(paths)})."
            raise ValueError(msg)
    else:
        folder = Path(files)
        sets = find_dictionary_files(folder)
        if not sets:
            msg = (
                f"{folder} holds no Geneformer dictionaries (token_dictionary*.pkl and "
                "gene_median_dictionary*.pkl); point to the folder holding them, e.g. the "
                "'geneformer/' folder of the Geneformer repository."
            )
            raise FileNotFoundError(msg)
        if len(sets) > 1:
            msg = (
                f"{folder} holds several sets of Geneformer dictionaries "
                f"({', '.join(repr(t) for t in sets)}); pass a dict {{kind: path}} to choose."
            )
            raise ValueError(msg)
        paths = next(iter(sets.values()))
    for kind, path in paths.items():
        if not path.is_file():
            msg = f"Geneformer {DICTIONARY_KINDS[kind]} file {path} does not exist."
            raise FileNotFoundError(msg)
    data: dict[str, dict[str, Any]] = {}
    digests: dict[str, str] = {}
    for kind, path in paths.items():
        data[kind], digests[kind] = read_dictionary(path, kind)
    return GeneformerDictionaries(
        token_ids=data["token"],
        medians=data["median"],
        gene_name_id=data.get("name_id", {}),
        mapping=data.get("mapping"),
        files={k: p.resolve() for k, p in paths.items()},
        sha256=digests,
    )
