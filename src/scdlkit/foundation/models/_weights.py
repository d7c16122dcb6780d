"""Reading a checkpoint's pickled weights file without running code in it, for every model."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_state_dict", "torch_load_tensors"]


def torch_load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; what it refuses, or cannot read, is a
    ``ValueError`` naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = (
            f"{path} holds pickled objects other than tensors and was not loaded: scdlkit reads "
            "weights with torch.load(weights_only=True) so a file you were handed cannot run code."
        )
        raise ValueError(msg) from err
    except (RuntimeError, EOFError) as err:  # an empty, truncated or corrupted file
        reason = str(err).split(". ")[0].strip().rstrip(".") or "it ends unexpectedly"
        if path.stat().st_size == 0:
            reason = "it is empty"
        msg = (
            f"{path} is not a readable PyTorch weights file ({reason}): it is probably "
            "truncated or corrupted. Download or copy the checkpoint again."
        )
        raise ValueError(msg) from err


def check_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` itself when it maps parameter names to tensors; else a ``ValueError``."""
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        msg = f"{path} is not a state dict (a mapping of parameter names to tensors)."
        raise ValueError(msg)
    return obj
