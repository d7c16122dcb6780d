"""Warnings attributed to the user's code, whichever scdlkit function raised them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["warn_user"]

_PACKAGE = str(Path(__file__).resolve().parents[1])


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first frame outside scdlkit, so the warning names the user's
    line however deep in scdlkit it arose (``skip_file_prefixes`` needs Python 3.12)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn_user
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
