"""The probability of every class, under the class names themselves.

``obsm[f"{key}_probabilities"]`` must survive ``write_h5ad`` and ``write_zarr``, and neither lets a
DataFrame column name hold ``/`` (zarr refuses it; anndata 0.12 warns that h5ad will refuse it from
its next minor release), while reference labels often do (``"CD4+/CD25 T Reg"``). So the stored
columns are the class names with ``/`` written ``_`` (``_`` appended while a name is taken), in
the order of ``uns[key]["label_categories"]``, which keeps the names as they are; anndata gives no
hook to rename only when writing. :func:`annotation_probabilities` reads the matrix back under
the real names, in memory, before or after a round trip through a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.slots import check_key_name

__all__ = ["annotation_probabilities", "label_probability", "probability_columns"]


def probability_columns(categories: Sequence[str]) -> list[str]:
    """Stored column names of the probability DataFrame: the categories, with ``/`` as ``_``.

    zarr (and h5ad from anndata's next minor release) refuse ``/`` in the names of a DataFrame's
    columns; ``uns[key]["label_categories"]`` keeps the names as they are, in the same order, and
    :func:`annotation_probabilities` reads the matrix under them.
    """
    columns: list[str] = []
    for name in categories:
        column = str(name).replace("/", "_")
        while column in columns:
            column = f"{column}_"
        columns.append(column)
    return columns


def annotation_probabilities(adata: AnnData, *, key: str = "scgpt_annotation") -> pd.DataFrame:
    """The probability of every class per cell, with the real class names as columns.

    ``adata.obsm[f"{key}_probabilities"]`` stores the same numbers with ``/`` in a class name
    written ``_`` (files cannot hold ``/`` there); this returns a copy whose columns are the
    runner's classes as they are, so ``probs["CD4+/CD25 T Reg"]`` works. Like
    :func:`scanpy.get.obs_df`, it only reads.

    Parameters
    ----------
    adata
        Cells labelled by :func:`scdlkit.tl.annotate` (with ``probabilities=True``, the default),
        in memory or read back from h5ad/zarr.
    key
        The ``key_added`` of that call.

    Returns
    -------
    pandas.DataFrame
        Cells (``adata.obs_names``) x classes (``uns[key]["label_categories"]``, in order);
        rows sum to 1.

    Examples
    --------
    >>> sck.tl.annotate(query, runner_dir)  # doctest: +SKIP
    >>> probs = annotation_probabilities(query)  # doctest: +SKIP
    >>> probs["CD4+/CD25 T Reg"].describe()  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    key = check_key_name("key", key)
    slot = f"{key}_probabilities"
    if slot not in adata.obsm:
        msg = (
            f"adata.obsm[{slot!r}] not found: run sck.tl.annotate(adata, runner, "
            f"key_added={key!r}) (probabilities=True is the default) first."
        )
        raise KeyError(msg)
    stored = adata.obsm[slot]
    record = adata.uns.get(key)
    categories = record.get("label_categories") if isinstance(record, Mapping) else None
    if categories is None:
        msg = (
            f"adata.uns[{key!r}]['label_categories'] not found: it names the columns of "
            f"adata.obsm[{slot!r}]; annotate again with sck.tl.annotate(adata, runner, "
            f"key_added={key!r})."
        )
        raise KeyError(msg)
    categories = [str(c) for c in np.asarray(categories, dtype=object).ravel()]
    values = stored.to_numpy() if isinstance(stored, pd.DataFrame) else np.asarray(stored)
    columns = list(stored.columns) if isinstance(stored, pd.DataFrame) else None
    if values.shape[1] != len(categories) or (
        columns is not None and [str(c) for c in columns] != probability_columns(categories)
    ):
        msg = (
            f"adata.obsm[{slot!r}] has columns {columns or values.shape[1]} that do not match "
            f"adata.uns[{key!r}]['label_categories'] ({len(categories)} classes): they come from "
            "different calls. Annotate again with sck.tl.annotate."
        )
        raise ValueError(msg)
    return pd.DataFrame(
        np.array(values, dtype=np.float32), index=adata.obs_names.copy(), columns=categories
    )


def label_probability(probabilities: pd.DataFrame, labels: Any) -> np.ndarray:
    """Per cell, the probability of ``labels[i]`` (NaN where that label is not a class,
    e.g. ``"Unknown"`` or ``"Heterogeneous"``)."""
    index = {str(c): j for j, c in enumerate(probabilities.columns)}
    cols = np.asarray([index.get(str(label), -1) for label in labels], dtype=np.int64)
    values = probabilities.to_numpy()
    out = np.full(len(cols), np.nan, dtype=np.float64)
    known = cols >= 0
    out[known] = values[np.flatnonzero(known), cols[known]]
    return out
