from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["package_versions"]

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
