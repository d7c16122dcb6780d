"""Matching the AnnData's genes to Geneformer tokens, with upstream's id mapping and collapsing.

Upstream (``tokenizer.py``, ``sum_ensembl_ids``; GENEFORMER_NOTES.md section 3.2) reads Ensembl
ids, maps them through the Ensembl mapping dictionary restricted to token genes, and sums columns
that map to one gene, but only when the file holds two *different* ids (in their exact case) that
map to one gene. When that file-level trigger fires, unmapped columns are dropped, every group of
columns of one gene is summed (exact duplicates too) and the sums come after the single columns,
in the order the genes first appear. Otherwise every mapped column is kept as it is, so an id
present twice gives its token twice. :class:`GeneformerGeneMatch` records the result as a column
plan: which input columns feed each token column, in order.

Gene symbols are not upstream's input. When the ids are not Ensembl ids, each symbol is first
converted with the gene name dictionary (``gene_name_id_dict``, exact case) and the resulting
Ensembl ids then go through the procedure above, as if the user had converted them before calling
upstream. V2's mapping dictionary also maps upper-cased symbols directly; that route is not used,
so a symbol matches the same way with V1 and V2 dictionaries and only through the dictionary
upstream provides for symbols.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scdlkit._shared.validation import gene_names
from scdlkit.foundation.models._gene_match import MatchCounts
from scdlkit.foundation.models.geneformer._dictionaries import (
    SPECIAL_TOKENS,
    GeneformerDictionaries,
)

__all__ = ["ID_TYPES", "GeneformerGeneMatch", "check_geneformer_overlap", "match_geneformer_genes"]

logger = logging.getLogger("scdlkit")

ID_TYPES = ("auto", "ensembl", "symbol")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G[A-Z]?\d{5,}(\.\d+)?$")
_VERSIONED = re.compile(r"^ENS[A-Z]*G[A-Z]?\d{5,}\.\d+$")


@dataclass(frozen=True)
class GeneformerGeneMatch(MatchCounts):
    """Which of the AnnData's genes reach a Geneformer token, and how columns become tokens.

    Attributes
    ----------
    names
        The identifiers read, one per ``var`` (``var[gene_key]`` or ``var_names``).
    id_type
        ``"ensembl"`` or ``"symbol"``: how ``names`` were read.
    ensembl_ids
        The token gene each ``var`` maps to (object array, ``None`` where none).
    token_ids
        Token id per ``var``, -1 where the gene reaches no token.
    collapsed
        Whether upstream's collapsing fired for this set of ids (see the module docstring).
    single_columns
        ``var`` positions of the token columns taken as they are, in order.
    summed_groups
        ``var`` positions summed into one token column each, in order; after the single columns.
    """

    names: pd.Index
    id_type: str
    ensembl_ids: np.ndarray = field(repr=False)
    token_ids: np.ndarray = field(repr=False)
    collapsed: bool
    single_columns: np.ndarray = field(repr=False)
    summed_groups: tuple[np.ndarray, ...] = field(repr=False)

    @property
    def vocab_ids(self) -> np.ndarray:
        """Token id per ``var``, -1 where none (the model contract's name for
        :attr:`token_ids`)."""
        return self.token_ids

    @property
    def n_versioned(self) -> int:
        """Unmatched Ensembl ids with a version suffix (``ENSG….5``), which upstream drops."""
        return sum(bool(_VERSIONED.match(str(n).upper())) for n in self.unmatched)

    @property
    def column_token_ids(self) -> np.ndarray:
        """Token id of each token column: the single columns, then the summed groups (int32)."""
        singles = self.token_ids[self.single_columns]
        sums = [self.token_ids[g[0]] for g in self.summed_groups]
        return np.concatenate([singles, np.asarray(sums, dtype=np.int64)]).astype(np.int32)

    @property
    def n_columns(self) -> int:
        """Number of token columns the matrix is reduced to."""
        return len(self.single_columns) + len(self.summed_groups)

    def summary(self) -> dict[str, Any]:
        """Plain, JSON-ready description (counts and the first unmatched identifiers)."""
        return {
            "id_type": self.id_type,
            "n_genes": len(self.names),
            "n_matched": self.n_matched,
            "ratio": self.ratio,
            "collapsed": self.collapsed,
            "n_summed_groups": len(self.summed_groups),
            "n_versioned_unmatched": self.n_versioned,
            "unmatched_head": self.unmatched[:20],
        }


def _looks_like_ensembl(names: pd.Index) -> bool:
    upper = [str(n).upper() for n in names]
    return bool(upper) and sum(bool(_ENSEMBL.match(n)) for n in upper) >= 0.5 * len(upper)


def _column_plan(
    ids: list[str | None], dictionaries: GeneformerDictionaries
) -> tuple[list[str | None], bool, np.ndarray, tuple[np.ndarray, ...]]:
    """Upstream's mapping and collapsing of Ensembl ids (``sum_ensembl_ids``, h5ad branch)."""
    mapping = dictionaries.gene_mapping
    # the trigger compares ids in their exact case, the mapping below upper-cases them
    present = [g for g in ids if g is not None and g in mapping]
    collapsed = len(set(present)) != len({mapping[g] for g in present})
    mapped = [None if g is None else mapping.get(g.upper()) for g in ids]
    if not collapsed:
        singles = np.array([j for j, g in enumerate(mapped) if g is not None], dtype=np.int64)
        return mapped, False, singles, ()
    counts = Counter(g for g in mapped if g is not None)
    repeated = [g for g, c in counts.items() if c > 1]  # in order of first appearance
    is_repeated = set(repeated)
    singles = np.array(
        [j for j, g in enumerate(mapped) if g is not None and g not in is_repeated],
        dtype=np.int64,
    )
    members: dict[str, list[int]] = {g: [] for g in repeated}
    for j, g in enumerate(mapped):
        if g in is_repeated:
            members[g].append(j)
    groups = tuple(np.array(members[g], dtype=np.int64) for g in repeated)
    return mapped, True, singles, groups


def match_geneformer_genes(
    adata: Any,
    dictionaries: GeneformerDictionaries,
    gene_key: str | None = None,
    *,
    id_type: str = "auto",
) -> GeneformerGeneMatch:
    """Map every gene of ``adata`` to a Geneformer token, as upstream's tokenizer does.

    Parameters
    ----------
    adata
        Cells x genes (only ``var`` is read).
    dictionaries
        The checkpoint's dictionaries.
    gene_key
        ``adata.var`` column with Ensembl ids (or symbols); ``None`` uses ``var_names``.
    id_type
        ``"ensembl"``, ``"symbol"``, or ``"auto"``: Ensembl when at least half of the
        identifiers (upper-cased) look like Ensembl gene ids.

    Returns
    -------
    GeneformerGeneMatch
        Token per ``var`` and the column plan (single columns, summed groups).

    Raises
    ------
    KeyError
        ``gene_key`` is not a column of ``adata.var``.
    ValueError
        ``id_type`` is unknown.

    Examples
    --------
    >>> match = match_geneformer_genes(adata, ckpt.dictionaries, "ensembl_id")  # doctest: +SKIP
    >>> match.n_matched, match.collapsed  # doctest: +SKIP
    """
    if id_type not in ID_TYPES:
        msg = f"id_type={id_type!r}; use one of {', '.join(map(repr, ID_TYPES))}."
        raise ValueError(msg)
    names = gene_names(adata, gene_key)
    if id_type == "auto":
        id_type = "ensembl" if _looks_like_ensembl(names) else "symbol"
    raw = [n if isinstance(n, str) else None for n in names]
    if id_type == "symbol":
        raw = [None if n is None else dictionaries.gene_name_id.get(n) for n in raw]
    mapped, collapsed, singles, groups = _column_plan(raw, dictionaries)
    token_ids = np.array(
        [
            -1 if g is None or g in SPECIAL_TOKENS else dictionaries.token_ids.get(g, -1)
            for g in mapped
        ],
        dtype=np.int64,
    )
    # the mapping is restricted to token genes, so every planned column has a token
    ensembl = np.array(
        [g if t >= 0 else None for g, t in zip(mapped, token_ids, strict=True)], dtype=object
    )
    return GeneformerGeneMatch(
        names=names,
        id_type=id_type,
        ensembl_ids=ensembl,
        token_ids=token_ids,
        collapsed=collapsed,
        single_columns=singles,
        summed_groups=groups,
    )


def check_geneformer_overlap(
    match: GeneformerGeneMatch, *, gene_key: str | None, min_gene_overlap: int | float = 1
) -> None:
    """Refuse data whose genes reach too few Geneformer tokens, saying what to pass instead.

    Parameters
    ----------
    match
        The gene match.
    gene_key
        The ``var`` column read (named in the message).
    min_gene_overlap
        Least number of genes (int), or fraction of the genes (float below 1), that must reach a
        token; at least one in any case.

    Raises
    ------
    ValueError
        When fewer genes match.
    """
    needed = (
        min_gene_overlap * len(match.names)
        if isinstance(min_gene_overlap, float) and min_gene_overlap < 1
        else min_gene_overlap
    )
    if match.n_versioned:
        logger.warning(
            "%d Ensembl ids carry a version suffix (e.g. ENSG00000141510.17) and match no "
            "Geneformer token, as upstream; strip the suffix to use them",
            match.n_versioned,
        )
    if match.n_matched == 0 or match.n_matched < needed:
        where = f"adata.var[{gene_key!r}]" if gene_key else "adata.var_names"
        sample = ", ".join(map(str, match.names[:5]))
        msg = (
            f"only {match.n_matched} of {len(match.names)} genes in {where} (read as "
            f"{match.id_type} identifiers) reach a Geneformer token (need at least {needed:g}; "
            f"first genes: {sample}). Geneformer reads human Ensembl gene ids: pass gene_key= "
            "naming the adata.var column that holds them (e.g. 'ensembl_id' or 'gene_ids')."
        )
        raise ValueError(msg)
