"""Saving and loading annotation runners: strict JSON manifest plus safetensors weights.

Nothing is unpickled. Saving goes through :func:`scdlkit._shared.persist.save_weights_folder`
(the one folder writer: a lock per folder, content-addressed weights written first, then the
manifest replaced atomically; an interrupted save leaves the previous one intact). Loading checks
the manifest against one schema (:data:`MANIFEST_SCHEMA` and the cross-checks below): every
field's presence, type and range, ``kind``, categories against the weights, ``best_strategy``
against the tensors present. Every failure is a ValueError naming the file, the field and the fix.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    Field,
    check_fields,
    folder_lock,
    read_checked_weights,
    read_manifest_with_digest,
    save_weights_folder,
)
from scdlkit._shared.provenance import package_versions
from scdlkit._shared.strategies import NEURAL_STRATEGIES, STRATEGIES
from scdlkit.foundation._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation._fitting import BaseWeights, StrategyResult, strategy_family

__all__ = [
    "KIND",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "SCHEMA_VERSION",
    "load_runner",
    "save_runner",
]

SCHEMA_VERSION = 1
KIND = "scdlkit.ScGPTAnnotationRunner"
_FIX = "save the runner again (AnnotationRunner.save) rather than editing its manifest"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _unique_strings(min_len: int) -> Any:
    def check(value: list[Any]) -> str | None:
        if not all(isinstance(v, str) for v in value):
            bad = next(v for v in value if not isinstance(v, str))
            return f"must hold only strings (found {bad!r})"
        if len(set(value)) != len(value):
            twice = sorted({v for v in value if value.count(v) > 1})
            return f"lists {twice[:3]} more than once"
        if len(value) < min_len:
            return f"must hold at least {min_len} entries, not {len(value)}"
        return None

    return check


def _records(value: list[Any]) -> str | None:
    if not all(isinstance(r, dict) for r in value):
        return "must be a list of objects"
    return None


def _metric_records(value: list[Any]) -> str | None:
    if not value or _records(value):
        return "must be a non-empty list of objects (one per strategy)"
    for record in value:
        if not isinstance(record.get("strategy"), str):
            return "has a row without a 'strategy' name"
        numbers = [v for k, v in record.items() if k != "strategy"]
        if any(isinstance(v, bool) or not isinstance(v, int | float | None) for v in numbers):
            return f"row {record['strategy']!r} holds a value that is not a number or null"
    return None


def _history(value: dict[str, Any]) -> str | None:
    if not all(isinstance(v, list) and not _records(v) for v in value.values()):
        return "must map strategy names to lists of per-epoch objects"
    return None


#: The manifest's fields: presence, JSON type and range. Cross-checks are in :func:`read_manifest`.
MANIFEST_SCHEMA = (
    Field("versions", (dict,), required=False),
    Field("checkpoint", (dict,)),
    Field("params", (dict,)),
    Field("init_params", (dict,), required=False),
    Field("matched_genes", (list,), required=False, check=_unique_strings(0)),
    Field("label_categories", (list,), check=_unique_strings(2)),
    Field(
        "best_strategy",
        (str,),
        check=lambda v: None if v in STRATEGIES else f"is {v!r}, not one of {list(STRATEGIES)}",
    ),
    Field("strategy_config", (dict, type(None)), required=False),
    Field("model_config", (dict, type(None)), required=False),
    Field("training", (dict, type(None)), required=False),
    Field("baseline_genes", (list, type(None)), required=False, check=_unique_strings(1)),
    Field("strategy_metrics", (list,), check=_metric_records),
    Field("history", (dict, type(None)), required=False, check=_history),
    Field("batch_metrics", (list, type(None)), required=False, check=_records),
    Field("split", (dict, type(None)), required=False),
    Field("normalisation", (dict, type(None)), required=False),
    Field(
        "weights_file",
        (str,),
        check=lambda v: (
            None
            if Path(v).name == v and v.endswith(".safetensors")
            else "must be the name of a .safetensors file inside the runner folder"
        ),
    ),
    Field(
        "weights_sha256",
        (str,),
        check=lambda v: None if _SHA256.fullmatch(v) else "must be 64 lowercase hex digits",
    ),
)
_CHECKPOINT_SCHEMA = (
    Field("checkpoint.name", (str,)),
    Field("checkpoint.path", (str,)),
    Field("checkpoint.sha256", (str,)),
    Field("checkpoint.args", (dict,)),
)
_MODEL_CONFIG_SCHEMA = (
    Field("model_config.num_classes", (int,)),
    Field("model_config.tuning_strategy", (str,)),
    Field("model_config.strategy_config", (dict, type(None)), required=False),
    Field("model_config.label_categories", (list, type(None)), required=False),
    Field(
        "model_config.classifier_dropout",
        (float,),
        required=False,
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    ),
)
#: Prefix of the tensors each non-neural family saves (neural ones: ``model.``, checked by the
#: model itself); each also saves the classifier's ``classes`` under it.
_FAMILY_PREFIX = {"frozen_probe": "probe.", "baseline": "baseline."}


def _history_records(runner: Any) -> dict[str, list[dict[str, Any]]]:
    # scdlkit.training's package imports the Trainer (lightning_fabric): only when saving
    from scdlkit.training.metrics import json_safe

    return {name: json_safe(df.to_dict(orient="records")) for name, df in runner.history_.items()}


def save_runner(runner: Any, path: Path) -> Path:
    """Write ``runner`` to the folder ``path`` (created if needed); returns the absolute folder.

    Sets ``runner.manifest_sha256_`` to the sha256 of the manifest written.
    """
    # safetensors is the foundation extra's: imported where it is needed
    from safetensors.torch import save_file

    # scdlkit.training's package imports the Trainer (lightning_fabric): only when saving
    from scdlkit.training.metrics import json_safe

    best: StrategyResult = runner._best
    family = strategy_family(best.strategy)
    path = Path(path).resolve()
    tensors = family.state(best.model)
    ckpt: ScGPTCheckpoint | None = runner.checkpoint_
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
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
        "normalisation": getattr(runner, "normalisation_", None),
    }

    def write_weights(file: Path) -> str:
        save_file(tensors, str(file))
        return ".safetensors"

    def render(weights_file: str, weights_sha256: str) -> str:
        record = {**manifest, "weights_file": weights_file, "weights_sha256": weights_sha256}
        return json.dumps(json_safe(record), indent=2, allow_nan=False)

    runner.manifest_sha256_ = save_weights_folder(path, write_weights, render, what="runner folder")
    return path


def read_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """Parse and validate ``manifest.json`` against the schema; returns it and its sha256."""
    manifest, digest = read_manifest_with_digest(
        path, MANIFEST_SCHEMA, schema_version=SCHEMA_VERSION, what="runner", kind=KIND, fix=_FIX
    )
    file = Path(path) / MANIFEST_NAME
    check_fields(file, _flatten(manifest, "checkpoint"), _CHECKPOINT_SCHEMA, fix=_FIX)
    best = manifest["best_strategy"]
    categories = manifest["label_categories"]
    listed = [r["strategy"] for r in manifest["strategy_metrics"]]
    if best not in listed:
        msg = (
            f"{file}: field 'best_strategy' is {best!r} but strategy_metrics lists only "
            f"{listed}; {_FIX}."
        )
        raise ValueError(msg)
    if best in NEURAL_STRATEGIES:
        if not isinstance(manifest.get("model_config"), dict):
            msg = f"{file}: field 'model_config' must be an object for strategy {best!r}; {_FIX}."
            raise ValueError(msg)
        config = manifest["model_config"]
        check_fields(file, _flatten(manifest, "model_config"), _MODEL_CONFIG_SCHEMA, fix=_FIX)
        unknown = sorted(set(config) - {f.name.split(".", 1)[1] for f in _MODEL_CONFIG_SCHEMA})
        if unknown:
            msg = f"{file}: field 'model_config' has unknown keys {unknown}; {_FIX}."
            raise ValueError(msg)
        if config["num_classes"] != len(categories):
            msg = (
                f"{file}: field 'model_config.num_classes' is {config['num_classes']} but "
                f"label_categories holds {len(categories)} names; {_FIX}."
            )
            raise ValueError(msg)
        if config["tuning_strategy"] != best:
            msg = (
                f"{file}: field 'best_strategy' is {best!r} but the saved model is "
                f"{config['tuning_strategy']!r} (model_config.tuning_strategy); {_FIX}."
            )
            raise ValueError(msg)
        if config.get("label_categories") not in (None, categories):
            msg = (
                f"{file}: field 'model_config.label_categories' differs from label_categories; "
                f"{_FIX}."
            )
            raise ValueError(msg)
    if best == "baseline" and not manifest.get("baseline_genes"):
        msg = f"{file}: field 'baseline_genes' is missing for strategy 'baseline'; {_FIX}."
        raise ValueError(msg)
    return manifest, digest


def _flatten(manifest: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {f"{name}.{k}": v for k, v in manifest[name].items()}


def check_tensors(file: Path, manifest: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Cross-check the weights against the manifest: the strategy's tensors, the classes."""
    best = manifest["best_strategy"]
    n_classes = len(manifest["label_categories"])
    prefix = _FAMILY_PREFIX.get(best, "model.")
    stray = sorted(k for k in tensors if not k.startswith(prefix))
    if stray or not tensors or (prefix != "model." and f"{prefix}classes" not in tensors):
        msg = (
            f"{file}: the weights hold {stray[:3] or sorted(tensors)[:3]}, not the tensors of a "
            f"{best!r} runner ({prefix}*): field 'best_strategy' does not match the weights; "
            f"{_FIX}."
        )
        raise ValueError(msg)
    if prefix == "model.":
        return  # the model checks its own tensor names and shapes when it is rebuilt
    classes = tensors[f"{prefix}classes"]
    if (
        classes.ndim != 1
        or classes.dtype.is_floating_point
        or classes.numel() < 2
        or len(torch.unique(classes)) != classes.numel()
        or int(classes.min()) < 0
        or int(classes.max()) >= n_classes
    ):
        msg = (
            f"{file}: the classifier's classes {classes.tolist()[:8]} do not fit the "
            f"{n_classes} names of field 'label_categories'; {_FIX}."
        )
        raise ValueError(msg)


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
    """Rebuild a runner saved by :func:`save_runner`; every check runs before the model is built.

    Sets ``runner_dir_`` (absolute) and ``manifest_sha256_`` (of the manifest bytes read).
    """
    path = Path(path)
    with folder_lock(path, what="runner folder", shared=True):  # no save mixes in between
        manifest, digest = read_manifest(path)
        tensors = read_checked_weights(path, manifest)
    file = path / MANIFEST_NAME
    check_tensors(path / manifest["weights_file"], manifest, tensors)
    arguments = _constructor_arguments(manifest, file, cls)
    ckpt = _resolve_base(manifest, checkpoint, verify)
    try:
        runner = cls(
            **{
                **arguments,
                "checkpoint": ckpt.path if ckpt is not None else arguments["checkpoint"],
                "device": device,
                "progress": False,
            }
        )
    except (TypeError, ValueError) as err:
        msg = f"{file}: field 'init_params' is not usable ({err}); {_FIX}."
        raise ValueError(msg) from err
    runner.checkpoint_ = ckpt
    runner.saved_checkpoint_ = (manifest["checkpoint"]["name"], manifest["checkpoint"]["path"])
    runner.label_categories_ = list(manifest["label_categories"])
    runner.matched_genes_ = list(manifest.get("matched_genes") or [])
    runner.best_strategy_ = manifest["best_strategy"]
    runner.strategy_metrics_ = _metrics_frame(manifest["strategy_metrics"])
    runner.history_ = {k: pd.DataFrame(v) for k, v in (manifest.get("history") or {}).items()}
    runner.split_summary_ = manifest.get("split") or {}
    runner.normalisation_ = manifest.get("normalisation")
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
        model=_rebuild(family, runner.best_strategy_, tensors, manifest, ckpt, path),
    )
    runner._fitted = True
    runner.runner_dir_ = path.resolve()
    runner.manifest_sha256_ = digest
    return runner


def _rebuild(
    family: Any,
    strategy: str,
    tensors: dict[str, Any],
    manifest: dict[str, Any],
    ckpt: ScGPTCheckpoint | None,
    path: Path,
) -> Any:
    """The family's model from the saved state; a mismatch names the files and the fix."""
    try:
        return family.from_state(strategy, tensors, manifest, BaseWeights(ckpt))
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        msg = (
            f"{path / manifest['weights_file']} does not fit the {strategy!r} model described by "
            f"{path / MANIFEST_NAME} (fields 'best_strategy', 'model_config', "
            f"'label_categories'): {err}; {_FIX}."
        )
        raise ValueError(msg) from err


def _constructor_arguments(manifest: dict[str, Any], file: Path, cls: type) -> dict[str, Any]:
    """The runner's constructor arguments: recorded once since schema 1.1, else from params."""
    recorded = manifest.get("init_params")
    if isinstance(recorded, dict):
        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(recorded) - accepted)
        if unknown or not isinstance(recorded.get("label_key"), str):
            what = f"unknown arguments {unknown}" if unknown else "no string 'label_key'"
            msg = f"{file}: field 'init_params' has {what}; {_FIX}."
            raise ValueError(msg)
        return dict(recorded)
    try:
        return _legacy_arguments(manifest["params"])
    except KeyError as err:
        msg = f"{file}: field 'params' lacks {err.args[0]!r} (and there is no init_params); {_FIX}."
        raise ValueError(msg) from None


def _legacy_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of runners saved before ``init_params`` were recorded."""
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
