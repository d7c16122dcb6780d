"""Progress bars: notebook widgets where ipywidgets is installed, plain text elsewhere."""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["tqdm"]


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm`` when ipywidgets can draw it, else the text bar.

    ``tqdm.auto`` in a notebook without ipywidgets warns "IProgress not found" on every bar and
    falls back to text anyway; checking first keeps notebooks quiet.
    """
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm as bar
    else:
        from tqdm.std import tqdm as bar
    return bar(*args, **kwargs)
