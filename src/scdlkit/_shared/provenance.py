from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["check_writable", "package_versions"]

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
