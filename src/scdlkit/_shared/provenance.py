from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["check_unique_genes", "check_writable", "package_versions"]

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
