"""Where scdlkit keeps what it downloads or derives: checkpoints, runners, dictionaries."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "default_cache_dir"]

CACHE_ENV_VAR = "SCDLKIT_CACHE_DIR"


def default_cache_dir() -> Path:
    """Folder that holds official checkpoints: ``$SCDLKIT_CACHE_DIR`` or the platform cache dir.

    The scGPT checkpoint named ``"whole-human"`` is looked up in ``<cache>/scgpt/whole-human/``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif xdg:
        base = Path(xdg)
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path.home() / ".cache"
    return base / "scdlkit"
