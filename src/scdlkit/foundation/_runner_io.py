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

import numpy as np
import pandas as pd
import torch

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    make_readable,
    read_checked_weights,
    read_manifest_file,
    sha256_file,
)
from scdlkit.foundation._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation._strategies import FEATURE_STRATEGIES, STRATEGIES, StrategyResult

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


def _weights_of(result: StrategyResult) -> dict[str, torch.Tensor]:
    strategy = result.strategy
    if strategy == "frozen_probe":
        scaler, probe = result.model["scaler"], result.model["probe"]
        arrays = {
            "probe.coef": probe.coef_,
            "probe.intercept": probe.intercept_,
            "probe.classes": probe.classes_,
            "probe.scaler_mean": scaler.mean_,
            "probe.scaler_scale": scaler.scale_,
        }
    elif strategy == "baseline":
        arrays = {f"baseline.{k}": v for k, v in result.model.state_arrays().items()}
    else:
        return {
            f"model.{k}": v.detach().cpu().contiguous()
            for k, v in result.model.adaptation_state_dict().items()
        }
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _history_records(runner: Any) -> dict[str, list[dict[str, Any]]]:
    from scdlkit.training.metrics import json_safe

    return {name: json_safe(df.to_dict(orient="records")) for name, df in runner.history_.items()}


def save_runner(runner: Any, path: Path) -> Path:
    """Write ``runner`` to the folder ``path`` (created if needed); returns the folder."""
    from safetensors.torch import save_file

    from scdlkit._shared.provenance import package_versions
    from scdlkit.training.metrics import json_safe

    best: StrategyResult = runner._best
    path.mkdir(parents=True, exist_ok=True)
    tensors = _weights_of(best)
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
        "matched_genes": list(getattr(runner, "matched_genes_", [])),
        "label_categories": list(runner.label_categories_),
        "best_strategy": best.strategy,
        "strategy_config": best.config,
        "model_config": best.model.config_dict() if hasattr(best.model, "config_dict") else None,
        "training": best.training,
        "baseline_genes": list(best.model.genes_) if best.strategy == "baseline" else None,
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


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _rebuild_model(
    strategy: str, manifest: dict[str, Any], tensors: dict, ckpt: Any, runner: Any
) -> Any:
    from scdlkit.foundation._loading import (
        build_encoder,
        load_encoder_weights,
        load_state_dict_file,
    )

    if strategy == "baseline":
        from scdlkit.baselines._expression import ExpressionLogisticBaseline

        arrays = {k: v.numpy() for k, v in _strip(tensors, "baseline.").items()}
        return ExpressionLogisticBaseline.from_state(arrays, manifest["baseline_genes"])
    state = load_state_dict_file(ckpt.weights_path)
    if strategy == "frozen_probe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        encoder = build_encoder(ckpt)
        encoder.load_report = load_encoder_weights(encoder, state)
        runner._base_encoder = encoder.to(runner._torch_device).eval()
        arrays = {k: v.numpy() for k, v in _strip(tensors, "probe.").items()}
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(scaler.mean_)
        probe = LogisticRegression()
        probe.coef_, probe.intercept_ = arrays["coef"], arrays["intercept"]
        probe.classes_ = arrays["classes"]
        probe.n_features_in_ = probe.coef_.shape[1]
        return {"scaler": scaler, "probe": probe}
    from scdlkit.foundation._annotation_model import build_annotation_model

    model = build_annotation_model(state, ckpt, **manifest["model_config"])
    model.load_adaptation_state_dict(_strip(tensors, "model."))
    if strategy in FEATURE_STRATEGIES:
        runner._base_encoder = model.encoder.to(runner._torch_device).eval()
    return model.eval()


def load_runner(cls: type, path: Path, *, checkpoint: Any, device: str, verify: bool) -> Any:
    """Rebuild a runner saved by :func:`save_runner`."""
    manifest = read_manifest(path)
    tensors = read_checked_weights(path, manifest)
    ckpt = _resolve_base(manifest, checkpoint, verify)
    params = manifest["params"]
    runner = cls(
        label_key=params["label_key"],
        checkpoint=ckpt.path if ckpt is not None else params.get("checkpoint", "whole-human"),
        strategies=params["strategies"],
        strategy_configs=params.get("strategy_configs") or None,
        batch_size=params["batch_size"],
        val_size=params["val_size"],
        test_size=params["test_size"],
        random_state=params["random_state"],
        device=device,
        gene_key=params.get("gene_key") or None,
        layer=params.get("layer") or None,
        precision=params.get("precision", "auto"),
        confidence_threshold=params.get("confidence_threshold"),
        attention_dropout=params.get("attention_dropout"),
        batch_key=params.get("batch_key"),
        split_by=params.get("split_by", "cells"),
        test_batches=params.get("test_batches"),
        val_batches=params.get("val_batches"),
        progress=False,
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
    runner._best = StrategyResult(
        strategy=runner.best_strategy_,
        metrics={},
        trainable_parameters=0,
        runtime_sec=0.0,
        config=manifest.get("strategy_config"),
        training=manifest.get("training"),
        model=_rebuild_model(runner.best_strategy_, manifest, tensors, ckpt, runner),
    )
    runner._fitted = True
    runner.runner_dir_ = path
    return runner


def _metrics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Strategy metrics back from JSON: ``null`` (undefined metric) becomes NaN again."""
    frame = pd.DataFrame(records)
    for column in frame.columns.drop("strategy"):
        frame[column] = pd.to_numeric(frame[column])
    return frame
