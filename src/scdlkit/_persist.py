"""Shared pieces of saving and loading fitted runners safely (no pickle, hash-checked files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["MANIFEST_NAME", "make_readable", "read_checked_weights", "sha256_file"]

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(file: Path) -> None:
    """Ordinary file permissions (some writers create 0600 files), so shared folders work."""
    umask = os.umask(0)
    os.umask(umask)
    Path(file).chmod(0o666 & ~umask)


def read_checked_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The safetensors file the manifest names, refused unless its sha256 matches the record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / manifest["weights_file"]
    if not file.is_file():
        msg = f"{file} is missing; the runner folder is incomplete."
        raise FileNotFoundError(msg)
    if sha256_file(file) != manifest["weights_sha256"]:
        msg = (
            f"{file} does not match the sha256 recorded in {MANIFEST_NAME}: the weights were "
            "changed after saving. Refusing to load them."
        )
        raise ValueError(msg)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:  # the hash matched a file that is not safetensors
        msg = f"{file} is not a safetensors file ({err})."
        raise ValueError(msg) from err
