"""Shared pieces of saving and loading fitted runners safely (no pickle, hash-checked files)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST_NAME",
    "make_readable",
    "read_checked_weights",
    "read_manifest_file",
    "sha256_file",
]

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


def read_manifest_file(
    path: Path,
    required: dict[str, type],
    *,
    schema_version: int,
    what: str,
    kind: str | None = None,
) -> dict[str, Any]:
    """Parse ``path/manifest.json`` and check its fields, kind and schema version.

    ``required`` maps field names to their JSON types; ``what`` names the saved object in the
    error for a folder without a manifest.
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        msg = f"{path} is not a saved {what}: {MANIFEST_NAME} is missing."
        raise FileNotFoundError(msg)
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        msg = f"{file} is not valid JSON ({err})."
        raise ValueError(msg) from err
    if not isinstance(manifest, dict):
        msg = f"{file} must hold a JSON object."
        raise ValueError(msg)
    for key, kind_of in required.items():
        value = manifest.get(key)
        if not isinstance(value, kind_of) or isinstance(value, bool):
            msg = f"{file}: field {key!r} is missing or not a {kind_of.__name__}."
            raise ValueError(msg)
    if kind is not None and manifest["kind"] != kind:
        msg = f"{file} holds a {manifest['kind']!r}, not a {kind}; load it with its own class."
        raise ValueError(msg)
    if manifest["schema_version"] != schema_version:
        msg = (
            f"{file} has schema_version {manifest['schema_version']}; this scdlkit reads "
            f"version {schema_version}. Save it again with a matching scdlkit."
        )
        raise ValueError(msg)
    return manifest
