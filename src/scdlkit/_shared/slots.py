"""Writing annotation results into AnnData slots, h5ad/zarr-safe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.provenance import package_versions

__all__ = ["check_key_added", "fit_summary_uns", "h5ad_safe", "write_annotation_slots"]

SPLIT_CATEGORIES = ["train", "val", "test", "unlabelled"]


def h5ad_safe(value: Any) -> Any:
    """Recursively make ``value`` writable by ``write_h5ad``/``write_zarr``.

    ``None`` becomes the string ``"None"`` (HDF5 has no null), lists of strings become string
    arrays and tuples lists; DataFrames and arrays pass through.
    """
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [h5ad_safe(v) for v in value]
        if items and all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object)
        if items and all(isinstance(v, int | float | bool | np.number) for v in items):
            return np.asarray(items)
        if not items:
            return np.asarray([], dtype=object)
        return {str(i): v for i, v in enumerate(items)}
    return value


def _written_by_scdlkit(adata: AnnData, key_added: str) -> bool:
    record = adata.uns.get(key_added)
    return isinstance(record, Mapping) and "runner_dir" in record and "best_strategy" in record


def check_key_added(adata: AnnData, key_added: str, *, inputs: Sequence[str | None] = ()) -> None:
    """Refuse, before any work, a ``key_added`` whose slots would overwrite the user's data.

    The obs columns written (``key_added``, ``_confidence``, ``_split``) must differ from the
    columns the call reads (``inputs``: the label and batch columns), and must not replace obs or
    obsm entries that an earlier scdlkit call (recorded in ``uns[key_added]``) did not write.
    """
    if not isinstance(key_added, str) or not key_added:
        msg = f"key_added={key_added!r} must be a non-empty string."
        raise ValueError(msg)
    columns = [key_added, f"{key_added}_confidence", f"{key_added}_split"]
    for column in columns:
        if column in {c for c in inputs if c}:
            msg = (
                f"key_added={key_added!r} would write obs[{column!r}], the column this call reads "
                "its labels or batches from, replacing it. Pass another key_added."
            )
            raise ValueError(msg)
    if _written_by_scdlkit(adata, key_added):
        return  # re-annotating: the slots are scdlkit's own
    taken = [f"obs[{c!r}]" for c in columns if c in adata.obs.columns]
    if f"X_{key_added}" in adata.obsm:
        taken.append(f"obsm['X_{key_added}']")
    if taken:
        msg = (
            f"key_added={key_added!r} would overwrite {', '.join(taken)}, which scdlkit did not "
            "write (uns holds no scdlkit record under that key). Pass another key_added, or "
            "delete those entries first."
        )
        raise ValueError(msg)


def write_annotation_slots(
    adata: AnnData,
    runner: Any,
    predictions: Mapping[str, np.ndarray],
    *,
    key_added: str,
    split: np.ndarray,
    uns: Mapping[str, Any],
) -> None:
    """obs labels/confidence/split, obsm latent and ``uns[key_added]`` (written last)."""
    categories = list(runner.label_categories_)
    if runner.confidence_threshold is not None:
        categories.append("Unknown")
    split_categories = [c for c in (*SPLIT_CATEGORIES, "query") if c in set(split)]
    adata.obs[key_added] = pd.Categorical(predictions["labels"], categories=categories)
    adata.obs[f"{key_added}_confidence"] = (
        predictions["probabilities"].max(axis=1).astype(np.float32)
    )
    adata.obs[f"{key_added}_split"] = pd.Categorical(split, categories=split_categories)
    adata.obsm[f"X_{key_added}"] = predictions["latent"]
    adata.uns[key_added] = h5ad_safe(
        {
            **uns,
            "best_strategy": runner.best_strategy_,
            "label_categories": list(runner.label_categories_),
            "runner_dir": str(Path(runner.runner_dir_).resolve()),
            "runner_manifest_sha256": getattr(runner, "manifest_sha256_", None) or "",
            "versions": package_versions(),
        }
    )


def fit_summary_uns(runner: Any) -> dict[str, Any]:
    """The fit-specific part of ``uns[key_added]``: params, metrics, histories, split."""
    uns = {
        "params": runner.params(),
        "strategy_metrics": runner.strategy_metrics_.copy(),
        "history": {name: frame.copy() for name, frame in runner.history_.items()},
        "split": dict(runner.split_summary_),
    }
    if getattr(runner, "repeat_metrics_", None) is not None:
        uns["repeat_metrics"] = runner.repeat_metrics_.copy()
    if getattr(runner, "batch_metrics_", None) is not None:
        uns["batch_metrics"] = runner.batch_metrics_.copy()
    return uns
