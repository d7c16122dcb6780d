"""What every model's gene match reports, from its ``names`` and ``vocab_ids``."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MatchCounts"]


class MatchCounts:
    """Counts of a gene match: ``names`` (one per ``var``) and ``vocab_ids`` (the token id each
    reaches, -1 where none) are the subclass's."""

    names: Any
    vocab_ids: np.ndarray

    @property
    def n_matched(self) -> int:
        """Number of ``var`` entries that reach a token."""
        return int((self.vocab_ids >= 0).sum())

    @property
    def ratio(self) -> float:
        """Fraction of the AnnData's genes that reach a token (0 when there are no genes)."""
        return self.n_matched / max(len(self.names), 1)

    @property
    def matched(self) -> list[str]:
        """Identifiers that reach a token, in ``var`` order."""
        return list(self.names[self.vocab_ids >= 0])

    @property
    def unmatched(self) -> list[str]:
        """Identifiers that reach no token, in ``var`` order."""
        return list(self.names[self.vocab_ids < 0])
