"""The TaskRunner's folder: a strict JSON manifest plus hash-checked weights, never unpickled.

Weights are a safetensors file when the ``safetensors`` package is installed (the ``foundation``
extra), else a :func:`torch.save` file of plain tensors that is read back with
``torch.load(weights_only=True)``, which refuses anything but tensors and containers. The
manifest names the file and its sha256 and records every tensor's shape and dtype, checked
before the model is built; either format loads wherever its reader is installed. A loader holds
the folder's lock shared while it reads the manifest and the weights, so a concurrent save never
hands it a manifest whose weights were removed.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    checked_weights_file,
    folder_lock,
    read_checked_weights,
    read_manifest_file,
    save_weights_folder,
)
from scdlkit._shared.provenance import (
    Field,
    check_fields,
    check_tensor_record,
    tensor_record,
    tensor_record_problem,
)
from scdlkit.baselines._models import build_model, resolve_task
from scdlkit.training.metrics import json_safe

__all__ = [
    "KIND",
    "SCHEMA_VERSION",
    "history_frame",
    "read_runner_folder",
    "restore_features",
    "restore_model",
    "runner_kwargs",
    "write_runner_folder",
]

SCHEMA_VERSION = 1
KIND = "scdlkit.TaskRunner"
WEIGHT_SUFFIXES = (".safetensors", ".pt")
_REQUIRED = {
    "schema_version": int,
    "kind": str,
    "model": str,
    "task": str,
    "params": dict,
    "model_config": dict,
    "genes": list,
    "label_categories": list,
    "metrics": dict,
    "weights_file": str,
    "weights_sha256": str,
}
_FIX = "save the runner again (TaskRunner.save) rather than editing its manifest"
#: Fields checked when present (older saves lack them).
_OPTIONAL_FIELDS = (
    Field("tensors", (dict,), required=False, check=tensor_record_problem),
    Field("retained_weights", (list,), required=False),
)
#: Recorded params passed back to ``TaskRunner(...)`` on load (device and progress are the
#: loader's choice; ``output_dir`` would save again).
_PARAM_NAMES = frozenset(
    {
        "model",
        "task",
        "latent_dim",
        "hidden_dims",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "dropout",
        "kl_weight",
        "class_weight",
        "precision",
        "label_key",
        "layer",
        "gene_key",
        "val_size",
        "test_size",
        "random_state",
        "early_stopping_patience",
        "n_neighbors",
    }
)


# ------------------------------------------------------------------------------------ write


def _write_weights(tensors: dict[str, torch.Tensor], file: Path) -> str:
    """Write ``tensors`` to ``file``; returns the suffix of the format used."""
    try:
        # Optional (the `foundation` extra); without it the torch format below is used.
        from safetensors.torch import save_file
    except ImportError:
        # Through a file object: torch derives the archive's inner name from a path's stem, and
        # the writer's temporary names (".scdlkit-tmp-...") are not valid there.
        with Path(file).open("wb") as fh:
            torch.save(tensors, fh)
        return ".pt"
    save_file(tensors, str(file))
    return ".safetensors"


def write_runner_folder(
    path: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]
) -> str:
    """Write the weights, then the manifest that names them, through the one folder writer.

    :func:`scdlkit._shared.persist.save_weights_folder` locks the folder, writes the weights under
    a new content-addressed name, replaces the manifest in one rename and keeps the weights the
    previous manifest named, so an interrupted or concurrent save never leaves a manifest naming a
    missing file. ``manifest`` gets ``weights_file``, ``weights_sha256`` and ``tensors`` (each
    tensor's shape and dtype) added. Returns the sha256 of the manifest written.
    """

    def render(weights_file: str, weights_sha256: str) -> str:
        record = {
            **manifest,
            "tensors": tensor_record(tensors),
            "weights_file": weights_file,
            "weights_sha256": weights_sha256,
        }
        return json.dumps(json_safe(record), indent=2, allow_nan=False)

    return save_weights_folder(
        path, lambda file: _write_weights(tensors, file), render, what="TaskRunner folder"
    )


# ------------------------------------------------------------------------------------- read


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json``; errors name the problem."""
    manifest = read_manifest_file(
        path, _REQUIRED, schema_version=SCHEMA_VERSION, what="TaskRunner", kind=KIND
    )
    file = path / MANIFEST_NAME
    try:
        resolve_task(manifest["model"], manifest["task"])
    except ValueError as err:
        msg = f"{file}: {err}"
        raise ValueError(msg) from err
    for key in ("genes", "label_categories"):
        if not all(isinstance(v, str) for v in manifest[key]):
            msg = f"{file}: field {key!r} must be a list of strings."
            raise ValueError(msg)
    if len(set(manifest["genes"])) != len(manifest["genes"]) or not manifest["genes"]:
        msg = f"{file}: field 'genes' must be a non-empty list of unique names."
        raise ValueError(msg)
    if Path(manifest["weights_file"]).name != manifest["weights_file"]:
        msg = f"{file}: weights_file must be a file name inside the runner folder."
        raise ValueError(msg)
    if Path(manifest["weights_file"]).suffix not in WEIGHT_SUFFIXES:
        msg = f"{file}: weights_file must end in .safetensors or .pt."
        raise ValueError(msg)
    check_fields(file, manifest, _OPTIONAL_FIELDS, fix=_FIX)
    return manifest


def _read_torch_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``.pt`` weights, refused unless their sha256 matches and they hold only tensors."""
    file = checked_weights_file(path, manifest)
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        msg = f"{file} is not a file of plain tensors ({err})."
        raise ValueError(msg) from err
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        msg = f"{file} must hold a dict of named tensors."
        raise ValueError(msg)
    return tensors


def read_runner_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The validated manifest and the hash-checked tensors of a saved TaskRunner.

    Read under the folder's shared lock (a save waits), so the weights are those the manifest
    names; their names, shapes and dtypes are checked against its record before anything is
    built from them.
    """
    path = Path(path)
    with folder_lock(path, what="TaskRunner folder", shared=True):
        manifest = _read_manifest(path)
        tensors = _read_weights(path, manifest)
    check_tensor_record(path / MANIFEST_NAME, manifest, tensors, fix=_FIX)
    return manifest, tensors


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    if manifest["weights_file"].endswith(".pt"):
        return _read_torch_weights(path, manifest)
    if importlib.util.find_spec("safetensors") is None:  # optional: the `foundation` extra
        msg = (
            f"{path / manifest['weights_file']} is a safetensors file: install safetensors "
            "(pip install 'scdlkit[foundation]') to load this runner."
        )
        raise ImportError(msg)
    return read_checked_weights(path, manifest)


def runner_kwargs(manifest: dict[str, Any]) -> dict[str, Any]:
    """The recorded params that ``TaskRunner(...)`` takes back."""
    kwargs = {k: v for k, v in manifest["params"].items() if k in _PARAM_NAMES}
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    return kwargs


def restore_features(
    tensors: dict[str, torch.Tensor], n_genes: int, file: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Pop and check ``features.mean`` and ``features.scale`` (float32, ``(n_genes,)``)."""
    stats = {}
    for name in ("mean", "scale"):
        tensor = tensors.pop(f"features.{name}", None)
        if tensor is None or tuple(tensor.shape) != (n_genes,):
            msg = f"{file}: the weights lack features.{name} of shape ({n_genes},)."
            raise ValueError(msg)
        stats[name] = tensor.numpy().astype(np.float32)
    finite = np.isfinite(stats["mean"]).all() and np.isfinite(stats["scale"]).all()
    if not (finite and (stats["scale"] > 0).all()):
        msg = f"{file}: features.mean/scale must be finite and the scale positive."
        raise ValueError(msg)
    return stats["mean"], stats["scale"]


def restore_model(
    name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], file: Path
) -> nn.Module:
    """Build model ``name`` from ``config`` and load the ``model.*`` tensors, strictly."""
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        model = build_model(name, config)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = sorted(k for k in tensors if not k.startswith("model."))
    try:
        if extra:
            msg = f"unexpected tensors {extra[:5]}"
            raise RuntimeError(msg)
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = f"{file}: the weights do not match the {name} model ({err})."
        raise ValueError(msg) from err
    return model.eval()


def history_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """History back from JSON: ``null`` becomes NaN again."""
    frame = pd.DataFrame(records)
    for column in frame.columns:
        frame[column] = pd.to_numeric(frame[column])
    if "epoch" in frame.columns:
        frame["epoch"] = frame["epoch"].astype(int)
    return frame
