"""Writing results into AnnData slots, h5ad/zarr-safe and all at once.

A tool builds everything it writes into a :class:`Slots` first and writes it last
(:meth:`Slots.write`), so a call that fails leaves the AnnData exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.labels import UNKNOWN_LABEL
from scdlkit._shared.provenance import package_versions

__all__ = [
    "SPLIT_CATEGORIES",
    "Slots",
    "annotation_slots",
    "check_key_added",
    "check_key_name",
    "fit_summary_uns",
    "h5ad_safe",
    "write_annotation_slots",
    "written_by_scdlkit",
]

SPLIT_CATEGORIES = ["train", "val", "calibration", "test", "unlabelled"]
#: The label of cells a runner does not label (under its threshold, or with no expression).
UNKNOWN = UNKNOWN_LABEL

#: Characters h5ad or zarr cannot hold in a key: ``/`` separates groups in both, a backslash
#: is read back as a separator by zarr, HDF5 strings cannot hold NUL.
_FORBIDDEN_KEY_CHARACTERS = ("/", "\\", "\x00")
#: Keys that name a folder itself (``.``) or its parent (``..``) in h5ad/zarr paths.
_FORBIDDEN_KEYS = frozenset({".", ".."})


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


def check_key_name(name: str, value: Any) -> str:
    """``value`` if it can name obs/obsm/uns entries that ``write_h5ad``/``write_zarr`` keep.

    Refuses, naming the argument, a non-string, an empty string, ``.``/``..`` and keys holding
    ``/``, a backslash or NUL (h5ad and zarr would refuse them, or read them back broken).
    """
    if not isinstance(value, str):
        msg = f"{name} must be a string, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    if not value:
        msg = f"{name} must be a non-empty string."
        raise ValueError(msg)
    bad = [c for c in _FORBIDDEN_KEY_CHARACTERS if c in value]
    if bad or value in _FORBIDDEN_KEYS:
        shown = ", ".join(repr(c) for c in bad) if bad else repr(value)
        msg = (
            f"{name}={value!r} cannot name AnnData slots: write_h5ad and write_zarr refuse "
            f"{shown} in keys (or read them back broken). Use letters, digits and '_', e.g. "
            f"{name}={_suggest(value)!r}."
        )
        raise ValueError(msg)
    return value


def _suggest(value: str) -> str:
    for char in _FORBIDDEN_KEY_CHARACTERS:
        value = value.replace(char, "_")
    return value.strip(".") or "scgpt"


def written_by_scdlkit(adata: AnnData, key_added: str) -> bool:
    """Whether ``uns[key_added]`` is the record of an scdlkit annotation (whose slots it owns)."""
    record = adata.uns.get(key_added)
    return isinstance(record, Mapping) and "runner_dir" in record and "best_strategy" in record


def check_key_added(
    adata: AnnData,
    key_added: Any,
    *,
    inputs: Sequence[str | None] = (),
    obs_columns: Iterable[str] = (),
    obsm_keys: Iterable[str] = (),
) -> str:
    """Refuse, before any work, a ``key_added`` whose slots would overwrite the user's data.

    ``key_added`` must name slots that h5ad and zarr keep (:func:`check_key_name`). The obs
    columns written (``key_added``, ``_confidence``, ``_split`` and ``obs_columns``) must differ
    from the columns the call reads (``inputs``: the label, batch and cluster columns), and must
    not replace obs or obsm entries (``X_{key_added}`` and ``obsm_keys``) that an earlier
    scdlkit call (recorded in ``uns[key_added]``) did not write.
    """
    key_added = check_key_name("key_added", key_added)
    columns = [key_added, f"{key_added}_confidence", f"{key_added}_split", *obs_columns]
    read = {c for c in inputs if c}
    for column in columns:
        if column in read:
            msg = (
                f"key_added={key_added!r} would write obs[{column!r}], a column this call reads "
                "(its labels, batches or clusters), replacing it. Pass another key_added."
            )
            raise ValueError(msg)
    if written_by_scdlkit(adata, key_added):
        return key_added  # re-annotating: the slots are scdlkit's own
    taken = [f"obs[{c!r}]" for c in columns if c in adata.obs.columns]
    taken += [f"obsm[{k!r}]" for k in (f"X_{key_added}", *obsm_keys) if k in adata.obsm]
    if taken:
        msg = (
            f"key_added={key_added!r} would overwrite {', '.join(taken)}, which scdlkit did not "
            "write (uns holds no scdlkit record under that key). Pass another key_added, or "
            "delete those entries first."
        )
        raise ValueError(msg)
    return key_added


@dataclass
class Slots:
    """Everything one call writes into an AnnData (and removes from it), built before writing.

    ``obs`` values are one per cell (arrays, Categoricals); ``obsm`` values have one row per
    cell (a DataFrame's index must be ``adata.obs_names``); ``uns`` values are stored as given.
    ``drop_obs``/``drop_obsm``/``drop_uns`` are removed where present (stale results of an
    earlier call that this one does not write).
    """

    obs: dict[str, Any] = field(default_factory=dict)
    obsm: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    drop_obs: list[str] = field(default_factory=list)
    drop_obsm: list[str] = field(default_factory=list)

    def check(self, adata: AnnData) -> None:
        """Refuse values that do not fit ``adata``, so that :meth:`write` cannot fail halfway."""
        for name, value in self.obs.items():
            if len(value) != adata.n_obs:
                msg = f"obs[{name!r}] has {len(value)} values for {adata.n_obs} cells."
                raise ValueError(msg)
        for name, value in self.obsm.items():
            if np.shape(value)[0] != adata.n_obs:
                msg = f"obsm[{name!r}] has {np.shape(value)[0]} rows for {adata.n_obs} cells."
                raise ValueError(msg)
            if isinstance(value, pd.DataFrame) and not value.index.equals(adata.obs_names):
                msg = f"obsm[{name!r}] is a DataFrame whose index is not adata.obs_names."
                raise ValueError(msg)

    def write(self, adata: AnnData) -> None:
        """Write every slot into ``adata``: obs in one assignment, then obsm, uns last."""
        self.check(adata)
        if self.obs or any(c in adata.obs.columns for c in self.drop_obs):
            obs = adata.obs.drop(columns=[c for c in self.drop_obs if c in adata.obs.columns])
            for name, value in self.obs.items():
                obs[name] = value
            adata.obs = obs
        for name in self.drop_obsm:
            if name in adata.obsm:
                del adata.obsm[name]
        for name, value in self.obsm.items():
            adata.obsm[name] = value
        for name, value in self.uns.items():
            adata.uns[name] = value


def annotation_slots(
    adata: AnnData,
    runner: Any,
    predictions: Mapping[str, np.ndarray],
    *,
    key_added: str,
    split: np.ndarray,
    uns: Mapping[str, Any],
) -> Slots:
    """obs labels/confidence/split, obsm latent and ``uns[key_added]`` of an annotation.

    A runner that was never saved is recorded with ``runner_dir`` ``"None"``, an empty
    ``runner_manifest_sha256`` and ``runner_saved`` ``False``.
    """
    categories = list(runner.label_categories_)
    labels = np.asarray(predictions["labels"], dtype=object)
    unsure = runner.confidence_threshold is not None or (labels == UNKNOWN).any()
    if unsure and UNKNOWN not in categories:
        categories.append(UNKNOWN)
    split_categories = [c for c in (*SPLIT_CATEGORIES, "query") if c in set(split)]
    runner_dir = getattr(runner, "runner_dir_", None)
    record = {
        **uns,
        "best_strategy": runner.best_strategy_,
        "label_categories": list(runner.label_categories_),
        "runner_dir": None if runner_dir is None else str(Path(runner_dir).resolve()),
        "runner_manifest_sha256": (
            (getattr(runner, "manifest_sha256_", None) or "") if runner_dir is not None else ""
        ),
        "runner_saved": runner_dir is not None,
        "versions": package_versions(),
    }
    return Slots(
        obs={
            key_added: pd.Categorical(labels, categories=categories),
            f"{key_added}_confidence": (
                predictions["probabilities"].max(axis=1).astype(np.float32)
            ),
            f"{key_added}_split": pd.Categorical(split, categories=split_categories),
        },
        obsm={f"X_{key_added}": predictions["latent"]},
        uns={key_added: h5ad_safe(record)},
    )


def write_annotation_slots(
    adata: AnnData,
    runner: Any,
    predictions: Mapping[str, np.ndarray],
    *,
    key_added: str,
    split: np.ndarray,
    uns: Mapping[str, Any],
) -> None:
    """Write :func:`annotation_slots` into ``adata`` (all built first, written last)."""
    annotation_slots(adata, runner, predictions, key_added=key_added, split=split, uns=uns).write(
        adata
    )


def fit_summary_uns(runner: Any) -> dict[str, Any]:
    """The fit-specific part of ``uns[key_added]``: params, metrics, histories, split."""
    uns = {
        "params": runner.params(),
        "strategy_metrics": runner.strategy_metrics_.copy(),
        "history": {name: frame.copy() for name, frame in runner.history_.items()},
        "split": dict(runner.split_summary_),
        "final_models": {
            k: dict(v) for k, v in (getattr(runner, "final_models_", None) or {}).items()
        },
    }
    if getattr(runner, "repeat_metrics_", None) is not None:
        uns["repeat_metrics"] = runner.repeat_metrics_.copy()
    if getattr(runner, "batch_metrics_", None) is not None:
        uns["batch_metrics"] = runner.batch_metrics_.copy()
    if getattr(runner, "calibration_curve_", None) is not None:
        uns["calibration_curve"] = runner.calibration_curve_.copy()
    return uns
