"""Saving and loading annotation runners: strict JSON manifest plus safetensors weights.

Nothing is unpickled. The folder always holds a consistent pair: the weights are written under a
new content-addressed name first, then ``manifest.json`` (which names them) is replaced
atomically, then stale weights are removed. An interrupted save leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    make_readable,
    read_checked_weights,
    read_manifest_file,
    sha256_file,
)
from scdlkit._shared.provenance import package_versions
from scdlkit._shared.strategies import STRATEGIES
from scdlkit.foundation._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation._fitting import BaseWeights, StrategyResult, strategy_family

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "load_runner", "save_runner"]

SCHEMA_VERSION = 1
_REQUIRED = {
    "schema_version": int,
    "kind": str,
    "best_strategy": str,
    "label_categories": list,
    "params": dict,
    "checkpoint": dict,
    "weights_file": str,
    "weights_sha256": str,
    "strategy_metrics": list,
}


def _history_records(runner: Any) -> dict[str, list[dict[str, Any]]]:
    # scdlkit.training's package imports the Trainer (lightning_fabric): only when saving
    from scdlkit.training.metrics import json_safe

    return {name: json_safe(df.to_dict(orient="records")) for name, df in runner.history_.items()}


def save_runner(runner: Any, path: Path) -> Path:
    """Write ``runner`` to the folder ``path`` (created if needed); returns the folder."""
    # safetensors is the foundation extra's: imported where it is needed
    from safetensors.torch import save_file

    # scdlkit.training's package imports the Trainer (lightning_fabric): only when saving
    from scdlkit.training.metrics import json_safe

    best: StrategyResult = runner._best
    family = strategy_family(best.strategy)
    path.mkdir(parents=True, exist_ok=True)
    tensors = family.state(best.model)
    tmp_weights = path / f".weights-{os.getpid()}.tmp"
    save_file(tensors, str(tmp_weights))
    digest = sha256_file(tmp_weights)
    weights_name = f"weights-{digest[:16]}.safetensors"
    make_readable(tmp_weights)
    os.replace(tmp_weights, path / weights_name)
    ckpt: ScGPTCheckpoint | None = runner.checkpoint_
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "scdlkit.ScGPTAnnotationRunner",
        "versions": package_versions(),
        "checkpoint": {  # a loaded baseline runner has no checkpoint: it never needed one
            "name": ckpt.name if ckpt is not None else str(runner.checkpoint),
            "path": str(ckpt.path) if ckpt is not None else "",
            "sha256": ckpt.weights_sha256
            if ckpt is not None and best.strategy != "baseline"
            else "",
            "args": ckpt.args.to_dict() if ckpt is not None else {},
        },
        "params": runner.params(),
        "init_params": runner.init_params_,
        "matched_genes": list(getattr(runner, "matched_genes_", [])),
        "label_categories": list(runner.label_categories_),
        "best_strategy": best.strategy,
        "strategy_config": best.config,
        "model_config": None,
        "training": best.training,
        "baseline_genes": None,
        **family.manifest_fields(best.model),
        "strategy_metrics": runner.strategy_metrics_.to_dict(orient="records"),
        "history": _history_records(runner),
        "batch_metrics": None
        if getattr(runner, "batch_metrics_", None) is None
        else runner.batch_metrics_.to_dict(orient="records"),
        "split": runner.split_summary_,
        "weights_file": weights_name,
        "weights_sha256": digest,
    }
    text = json.dumps(json_safe(manifest), indent=2, allow_nan=False)
    tmp_manifest = path / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    tmp_manifest.write_text(text)
    make_readable(tmp_manifest)
    os.replace(tmp_manifest, path / MANIFEST_NAME)
    for stale in path.glob("weights-*.safetensors"):
        if stale.name != weights_name:
            stale.unlink()
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json``; errors name the problem."""
    manifest = read_manifest_file(path, _REQUIRED, schema_version=SCHEMA_VERSION, what="runner")
    file = path / MANIFEST_NAME
    if manifest["best_strategy"] not in STRATEGIES:
        msg = f"{file}: unknown best_strategy {manifest['best_strategy']!r}."
        raise ValueError(msg)
    if Path(manifest["weights_file"]).name != manifest["weights_file"]:
        msg = f"{file}: weights_file must be a file name inside the runner folder."
        raise ValueError(msg)
    return manifest


def _resolve_base(
    manifest: dict[str, Any], checkpoint: Any, verify: bool
) -> ScGPTCheckpoint | None:
    if manifest["best_strategy"] == "baseline":
        return None
    recorded = manifest["checkpoint"]
    if checkpoint is None:
        checkpoint = recorded["path"] if Path(recorded["path"]).is_dir() else recorded["name"]
    ckpt = resolve_checkpoint(checkpoint)
    if verify and ckpt.weights_sha256 != recorded.get("sha256"):
        msg = (
            f"base checkpoint {ckpt.path} differs from the one this runner was trained on "
            f"(sha256 {ckpt.weights_sha256[:12]}... vs {str(recorded.get('sha256'))[:12]}...). "
            "Pass the original checkpoint=, or verify_checkpoint=False to load anyway."
        )
        raise ValueError(msg)
    return ckpt


def load_runner(cls: type, path: Path, *, checkpoint: Any, device: str, verify: bool) -> Any:
    """Rebuild a runner saved by :func:`save_runner`."""
    manifest = read_manifest(path)
    tensors = read_checked_weights(path, manifest)
    ckpt = _resolve_base(manifest, checkpoint, verify)
    arguments = _constructor_arguments(manifest)
    runner = cls(
        **{
            **arguments,
            "checkpoint": ckpt.path if ckpt is not None else arguments["checkpoint"],
            "device": device,
            "progress": False,
        }
    )
    runner.checkpoint_ = ckpt
    runner.label_categories_ = list(manifest["label_categories"])
    runner.matched_genes_ = list(manifest.get("matched_genes") or [])
    runner.best_strategy_ = manifest["best_strategy"]
    runner.strategy_metrics_ = _metrics_frame(manifest["strategy_metrics"])
    runner.history_ = {k: pd.DataFrame(v) for k, v in (manifest.get("history") or {}).items()}
    runner.split_summary_ = manifest.get("split") or {}
    batch_records = manifest.get("batch_metrics")
    runner.batch_metrics_ = None if batch_records is None else pd.DataFrame(batch_records)
    runner._features = None
    runner._base_encoder = None
    family = strategy_family(runner.best_strategy_)
    runner._best = StrategyResult(
        strategy=runner.best_strategy_,
        metrics={},
        trainable_parameters=0,
        runtime_sec=0.0,
        config=manifest.get("strategy_config"),
        training=manifest.get("training"),
        model=family.from_state(runner.best_strategy_, tensors, manifest, BaseWeights(ckpt)),
    )
    runner._fitted = True
    runner.runner_dir_ = path.resolve()
    return runner


def _constructor_arguments(manifest: dict[str, Any]) -> dict[str, Any]:
    """The runner's constructor arguments: recorded once since schema 1.1, else from params."""
    recorded = manifest.get("init_params")
    if isinstance(recorded, dict):
        return dict(recorded)
    params = manifest["params"]  # runners saved before init_params were recorded
    return {
        "label_key": params["label_key"],
        "checkpoint": params.get("checkpoint", "whole-human"),
        "strategies": params["strategies"],
        "strategy_configs": params.get("strategy_configs") or None,
        "batch_size": params["batch_size"],
        "val_size": params["val_size"],
        "test_size": params["test_size"],
        "random_state": params["random_state"],
        "gene_key": params.get("gene_key") or None,
        "layer": params.get("layer") or None,
        "training": params.get("training") or {},
        "precision": params.get("precision", "auto"),
        "confidence_threshold": params.get("confidence_threshold"),
        "attention_dropout": params.get("attention_dropout"),
        "batch_key": params.get("batch_key"),
        "split_by": params.get("split_by", "cells"),
        "test_batches": params.get("test_batches"),
        "val_batches": params.get("val_batches"),
    }


def _metrics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Strategy metrics back from JSON: ``null`` (undefined metric) becomes NaN again."""
    frame = pd.DataFrame(records)
    for column in frame.columns.drop("strategy"):
        frame[column] = pd.to_numeric(frame[column])
    return frame
