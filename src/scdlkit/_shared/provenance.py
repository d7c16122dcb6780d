"""What a saved object records about itself, and the checks that hold it to the record.

Package versions; the schema of JSON records (:class:`Field`, :func:`check_fields`: presence, type
and range of each field, errors naming the file, the field and the fix); the names, shapes and
dtypes of saved tensors (:func:`tensor_record`, checked by :func:`check_tensor_record` before
anything is built from them); and input checks that keep a result tied to its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = [
    "Field",
    "check_fields",
    "check_tensor_record",
    "check_unique_genes",
    "check_writable",
    "package_versions",
    "tensor_record",
    "tensor_record_problem",
]

_PACKAGES = ("scdlkit", "torch", "anndata", "scanpy", "numpy", "scikit-learn")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, for provenance in ``uns``/manifests."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def check_writable(adata: Any, *, copy: bool) -> None:
    """Refuse, before any work, an AnnData the results could not be written into.

    A backed AnnData takes results in memory (``obs``/``obsm``/``uns``; ``adata.write()`` in
    ``"r+"`` mode or ``write_h5ad(new_path)`` saves them), but anndata can neither copy it without
    a filename nor turn a view of it into an actual object.
    """
    if not getattr(adata, "isbacked", False):
        return
    if adata.is_view:
        msg = (
            "`adata` is a view of a backed AnnData, which anndata cannot write results into. "
            "Pass the whole backed AnnData, or load the subset first: `adata[cells].to_memory()`."
        )
        raise ValueError(msg)
    if copy:
        msg = (
            "`copy=True` is not possible for a backed AnnData without loading it into memory. "
            "Use `copy=False` (results go into `adata.obs`/`obsm`/`uns` in memory; save them "
            "with `adata.write_h5ad(path)`), or pass `adata.to_memory()`."
        )
        raise ValueError(msg)


def check_unique_genes(names: Any, *, vocab: Any = None, gene_key: str | None = None) -> None:
    """Refuse duplicated gene names, before any work: they would be read as one gene twice.

    With ``vocab``, only names the model can use count, so unmapped genes that share a
    placeholder name (``nan``) are fine; without it (the expression baseline reads every gene)
    every name counts.
    """
    where = "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]"
    seen: set[str] = set()
    twice: list[str] = []
    for name in map(str, names):
        if vocab is not None and name not in vocab:
            continue
        if name in seen and name not in twice:
            twice.append(name)
        seen.add(name)
    if twice:
        shown = ", ".join(map(repr, twice[:5])) + (
            f" and {len(twice) - 5} more" if len(twice) > 5 else ""
        )
        msg = (
            f"{where} holds {len(twice)} duplicated gene name(s) ({shown}), common after mapping "
            "Ensembl ids to symbols; each would be counted as one gene twice and change the "
            "predictions. Aggregate the duplicates (e.g. sum their counts) or make the names "
            "unique with `adata.var_names_make_unique()` first."
        )
        raise ValueError(msg)


# ------------------------------------------------------------------------------- JSON records


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


# ------------------------------------------------------------------------------ tensor record


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def tensor_record(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"shape": [...], "dtype": "float32"}}`` of the tensors saved, for the manifest."""
    return {
        name: {"shape": [int(n) for n in tensors[name].shape], "dtype": _dtype_name(tensors[name])}
        for name in sorted(tensors)
    }


def tensor_record_problem(value: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's ``tensors`` field (for :class:`Field`), or ``None``."""
    for name, entry in value.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(entry.get("dtype"), str)
        ):
            return (
                f"entry {name!r} must be an object with 'shape' (a list of sizes) and 'dtype' "
                "(a string)"
            )
    return None


def check_tensor_record(
    manifest_file: Path, manifest: Mapping[str, Any], tensors: Mapping[str, Any], *, fix: str
) -> None:
    """Refuse weights whose tensor names, shapes or dtypes differ from the manifest's record.

    Runs before anything is built from the tensors. A manifest saved before the record was kept
    (no ``tensors`` field) is not checked here. Each error is a ValueError naming the tensor,
    the weights file, both shapes (or dtypes) and ``fix``.
    """
    record = manifest.get("tensors")
    if record is None:
        return
    weights = Path(manifest_file).parent / manifest["weights_file"]
    extra = sorted(set(tensors) - set(record))
    missing = sorted(set(record) - set(tensors))
    if extra or missing:
        name = (extra or missing)[0]
        where = "holds" if extra else "lacks"
        msg = (
            f"{weights} {where} tensor {name!r}, which field 'tensors' of {manifest_file} "
            f"{'does not list' if extra else 'lists'}: the weights and the manifest belong to "
            f"different saves; {fix}."
        )
        raise ValueError(msg)
    for name in sorted(record):
        want, got = record[name], tensors[name]
        shape, dtype = [int(n) for n in got.shape], _dtype_name(got)
        if shape != want["shape"] or dtype != want["dtype"]:
            msg = (
                f"{weights}: tensor {name!r} has shape {tuple(shape)} and dtype {dtype}, but "
                f"field 'tensors' of {manifest_file} records shape {tuple(want['shape'])} and "
                f"dtype {want['dtype']}; {fix}."
            )
            raise ValueError(msg)
