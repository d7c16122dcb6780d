"""How a matrix was normalised (counts, log1p to a fixed total, other), to compare a query with
the reference a runner was fitted on.

scGPT's tokens are ranks within a cell, so any per-cell monotone transform gives the same tokens;
the expression baseline log-normalises counts to 10,000 per cell itself. What changes
predictions is a query log-normalised to another total (``log1p`` of CPM against ``log1p`` to
10,000, say) or values that are neither counts nor ``log1p`` of normalised counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

from scdlkit._shared.validation import get_matrix

__all__ = ["describe_normalisation", "normalisation_mismatch"]

#: Counts are log-normalised to this total by the expression baseline.
COUNTS_TARGET = 1e4
#: ``log1p`` data whose per-cell ``expm1`` totals vary less than this (relative IQR) were
#: normalised to that total over these genes.
FIXED_TOTAL_SPREAD = 0.01
#: Effective totals further apart than this factor are reported.
TOTAL_RATIO = 2.0


def describe_normalisation(adata: Any, layer: str | None, *, max_cells: int = 2000) -> dict:
    """``kind`` (``"counts"``, ``"log1p"``, ``"other"``), ``typical_total`` (median per-cell
    total: of the counts, or of ``expm1`` of the values) and ``target_sum`` (the fixed total of
    ``log1p`` data, ``None`` when the totals vary, e.g. on a subset of the genes), from up to
    ``max_cells`` cells spread over the data."""
    matrix = get_matrix(adata, layer)
    n = matrix.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, max_cells)).astype(int)) if n else []
    if not len(rows):
        return {"kind": "other", "typical_total": 0.0, "target_sum": None}
    block = matrix[rows]
    if hasattr(block, "compute"):
        block = block.compute()
    if hasattr(block, "to_memory"):
        block = block.to_memory()
    block = sparse.csr_matrix(block, dtype=np.float64)
    data = block.data[block.data != 0]
    if data.size == 0 or not np.isfinite(data).all() or (data < 0).any():
        return {"kind": "other", "typical_total": 0.0, "target_sum": None}
    if np.allclose(data, np.round(data)):
        totals = np.asarray(block.sum(axis=1)).ravel()
        return {"kind": "counts", "typical_total": float(np.median(totals)), "target_sum": None}
    if data.max() > 20:  # log1p of any realistic total stays far below; e.g. CPM without log
        totals = np.asarray(block.sum(axis=1)).ravel()
        return {"kind": "other", "typical_total": float(np.median(totals)), "target_sum": None}
    block.data = np.expm1(block.data)
    totals = np.asarray(block.sum(axis=1)).ravel()
    totals = totals[totals > 0]
    median = float(np.median(totals))
    q1, q3 = np.percentile(totals, [25, 75])
    fixed = (q3 - q1) / max(median, 1e-12) < FIXED_TOTAL_SPREAD
    return {
        "kind": "log1p",
        "typical_total": median,
        "target_sum": float(np.round(median, 3)) if fixed else None,
    }


def _effective_total(description: dict) -> float | None:
    if description["kind"] == "counts":
        return COUNTS_TARGET
    return description.get("target_sum")


def _say(description: dict) -> str:
    kind, total = description["kind"], description["typical_total"]
    if kind == "counts":
        return f"raw counts (median {total:,.0f} per cell)"
    if kind == "log1p" and description.get("target_sum") is not None:
        return f"log1p-normalised to {description['target_sum']:,.0f} per cell"
    if kind == "log1p":
        return f"log1p-normalised (median expm1 total {total:,.0f} per cell over these genes)"
    return "neither counts nor log1p-normalised values"


def normalisation_mismatch(reference: dict | None, query: dict) -> str | None:
    """A sentence naming both normalisations when they would change predictions, else ``None``.

    Counts and ``log1p`` to 10,000 agree (counts are normalised that way); ``log1p`` of unknown
    total (a gene subset) is not compared; anything else against counts or ``log1p`` differs.
    """
    if not reference:
        return None
    kinds = {reference["kind"], query["kind"]}
    if "other" in kinds and kinds != {"other"}:
        differs = True
    else:
        ref_total, query_total = _effective_total(reference), _effective_total(query)
        differs = (
            ref_total is not None
            and query_total is not None
            and max(ref_total, query_total) > TOTAL_RATIO * min(ref_total, query_total)
        )
    if not differs:
        return None
    return (
        f"the reference held {_say(reference)}, the query holds {_say(query)}: normalise the "
        "query like the reference (e.g. sc.pp.normalize_total(query, target_sum=1e4); "
        "sc.pp.log1p(query)), or pass layer= with raw counts, for labels you can trust."
    )
