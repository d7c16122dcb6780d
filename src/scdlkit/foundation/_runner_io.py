"""Saving and loading annotation runners: strict JSON manifest plus safetensors weights.

Nothing is unpickled. Saving goes through :func:`scdlkit._shared.persist.save_weights_folder`
(the one folder writer: a lock per folder, content-addressed weights written first, then the
manifest replaced atomically; an interrupted save leaves the previous one intact). Loading checks
the manifest against one schema (:data:`MANIFEST_SCHEMA` and the cross-checks below): every
field's presence, type and range, ``kind``, categories against the weights, ``best_strategy``
against the tensors present, every tensor's name, shape and dtype against the manifest's record.
Every failure is a ValueError naming the file, the field and the fix.

Provenance: the manifest pins every file of the base checkpoint that changes the runner's
outputs (``args.json``, ``vocab.json``, ``best_model.pt``) by sha256, and loading refuses a
checkpoint whose files differ (unless ``verify_checkpoint=False``). A manifest never decides
where files are written: the ``output_dir`` and ``overwrite`` it records are not restored.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdlkit._shared.persist import (
    MANIFEST_NAME,
    folder_lock,
    read_checked_weights,
    read_manifest_with_digest,
    save_weights_folder,
)
from scdlkit._shared.provenance import (
    Field,
    check_fields,
    check_tensor_record,
    package_versions,
    tensor_record,
    tensor_record_problem,
)
from scdlkit._shared.strategies import STRATEGIES
from scdlkit.foundation._conformal import ConformalCalibration
from scdlkit.foundation._fitting import BaseWeights, StrategyResult
from scdlkit.foundation.models import is_model_checkpoint, model_card, resolve_model_checkpoint
from scdlkit.foundation.models._contract import ModelCheckpoint
from scdlkit.foundation.strategies import strategy_family

__all__ = [
    "KIND",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "SCHEMA_VERSION",
    "load_kept",
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


def _pins(value: dict[str, Any]) -> str | None:
    # which files a checkpoint has depends on its model (Geneformer's dictionaries are named by
    # release): here only that each is a file name; loading checks each against the checkpoint
    unknown = sorted(k for k in value if not k or Path(k).name != k or k in {".", ".."})
    if unknown:
        return f"names {unknown}, not file names of a checkpoint folder"
    bad = sorted(k for k, v in value.items() if not (isinstance(v, str) and _SHA256.fullmatch(v)))
    if bad:
        return f"must map each file to 64 lowercase hex digits (not for {bad})"
    return None


def _kept_pins(value: dict[str, Any] | None) -> str | None:
    if value is None:
        return None
    bad = sorted(
        k
        for k, v in value.items()
        if k not in STRATEGIES or not (isinstance(v, str) and _SHA256.fullmatch(v))
    )
    if bad:
        return f"must map strategy names to manifest sha256s (not for {bad})"
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
    Field("tensors", (dict,), required=False, check=tensor_record_problem),
    Field("final_models", (dict, type(None)), required=False),
    Field("kept_strategies", (dict, type(None)), required=False, check=_kept_pins),
    Field("retained_weights", (list,), required=False, check=_records),
)
_CHECKPOINT_SCHEMA = (
    Field("checkpoint.name", (str,)),
    Field("checkpoint.path", (str,)),
    Field("checkpoint.sha256", (str,)),
    Field("checkpoint.files", (dict,), required=False, check=_pins),
    Field("checkpoint.args", (dict,)),
)
#: What a manifest may not decide: where a refit of the loaded runner writes. Restored as these.
_NOT_RESTORED = {"output_dir": None, "overwrite": False}
_MODEL_CONFIG_SCHEMA = (
    Field("model_config.num_classes", (int,)),
    Field("model_config.tuning_strategy", (str,)),
    Field("model_config.strategy_config", (dict, type(None)), required=False),
    Field("model_config.label_categories", (list, type(None)), required=False),
    Field("model_config.input_norm", (str,), required=False),  # the model checks its value
    Field(
        "model_config.classifier_dropout",
        (float,),
        required=False,
        check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    ),
)


def _resolved_params(runner: Any) -> dict[str, Any]:
    """The entries of ``runner.params()`` that ``init_params`` does not already hold as they are
    (the checkpoint's path, every strategy's resolved training settings, the precision used)."""
    recorded = runner.init_params_
    return {k: v for k, v in runner.params().items() if k not in recorded or recorded[k] != v}


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

    best: StrategyResult = runner.kept_result()
    family = strategy_family(best.strategy)
    path = Path(path).resolve()
    kept = _save_kept(runner, path)
    tensors = {**family.state(best.model), **_conformal_state(best)}
    ckpt: ModelCheckpoint | None = runner.checkpoint_
    pinned = ckpt is not None and family.uses_checkpoint
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "versions": package_versions(),
        "checkpoint": {  # a loaded baseline runner has no checkpoint: it never needed one
            "name": ckpt.name if ckpt is not None else str(runner.checkpoint),
            "path": str(ckpt.path) if ckpt is not None else "",
            "sha256": ckpt.weights_sha256 if pinned else "",
            "files": ckpt.files_sha256 if pinned else {},  # everything that changes outputs
            "args": ckpt.config_dict() if ckpt is not None else {},
            "model": ckpt.model_name if ckpt is not None else "",
            "d_model": ckpt.d_model if ckpt is not None else None,
            "options": ckpt.resolve_options() if ckpt is not None else {},
        },
        # the constructor's arguments once; beside them only what params() resolves or adds
        "params": _resolved_params(runner),
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
        "tensors": tensor_record(tensors),
        "final_models": getattr(runner, "final_models_", None),
        "kept_strategies": kept,
    }

    def write_weights(file: Path) -> str:
        save_file(tensors, str(file))
        return ".safetensors"

    def render(weights_file: str, weights_sha256: str) -> str:
        record = {**manifest, "weights_file": weights_file, "weights_sha256": weights_sha256}
        return json.dumps(json_safe(record), indent=2, allow_nan=False)

    runner.manifest_sha256_ = save_weights_folder(path, write_weights, render, what="runner folder")
    return path


#: Where a runner fitted with ``keep="all"`` saves the model of each other strategy.
KEPT_FOLDER = "strategies"


def _save_kept(runner: Any, path: Path) -> dict[str, str] | None:
    """Save every kept strategy but the best as a runner of its own under ``strategies/<name>``
    (first: the main manifest, written last, pins each by its manifest's sha256)."""
    others = [n for n in getattr(runner, "kept_strategies_", []) if n != runner.best_strategy_]
    if not others:
        return None
    pins = {}
    for name in others:
        kept = runner.kept_result(name)  # first: a baseline runner finds its checkpoint here
        view = copy.copy(runner)
        view._best, view.best_strategy_ = kept, name
        view._kept, view.kept_strategies_ = {name: view._best}, [name]
        view.final_models_ = {name: runner.final_models_.get(name)}
        save_runner(view, path / KEPT_FOLDER / name)
        pins[name] = view.manifest_sha256_
    return pins


def load_kept(runner: Any, name: str) -> StrategyResult:
    """The kept model of strategy ``name`` of a saved runner, checked against the sha256 the
    runner's manifest pins for it."""
    pins = getattr(runner, "kept_pins_", None) or {}
    kept = sorted({*getattr(runner, "kept_strategies_", [runner.best_strategy_]), *pins})
    if name not in pins:
        msg = (
            f"strategy {name!r} was not kept: this runner labels with {kept}. Fit with "
            "keep='all' to label with any fitted strategy."
        )
        raise ValueError(msg)
    folder = Path(runner.runner_dir_) / KEPT_FOLDER / name
    checkpoint, verify = getattr(runner, "load_options_", (None, True))
    # the resolved checkpoint itself: a folder alone may not say where its parts are (Geneformer)
    base = runner.checkpoint_ if runner.checkpoint_ is not None else checkpoint
    other = type(runner).load(
        folder, checkpoint=base, device=runner.device, verify_checkpoint=verify
    )
    if other.manifest_sha256_ != pins[name]:
        msg = (
            f"{folder / MANIFEST_NAME} is not the {name!r} model saved with the runner in "
            f"{runner.runner_dir_} (its sha256 differs from the one pinned there); {_FIX}."
        )
        raise ValueError(msg)
    if runner.checkpoint_ is None:  # a baseline runner: the kept model found and checked it
        runner.checkpoint_ = other.checkpoint_
    return other.kept_result()


#: Prefix of the conformal calibration's tensors (scores, labels, temperature) in the weights.
CONFORMAL_PREFIX = "conformal."


def _conformal_state(result: StrategyResult) -> dict[str, torch.Tensor]:
    calibration = result.extra.get("conformal")
    if calibration is None:
        return {}
    return {
        f"{CONFORMAL_PREFIX}{k}": torch.from_numpy(np.ascontiguousarray(v))
        for k, v in calibration.state_arrays().items()
    }


def _rebuild_conformal(
    file: Path, tensors: Mapping[str, Any], n_classes: int
) -> ConformalCalibration | None:
    """The saved calibration, its shapes and values checked; ``None`` when none was saved."""
    arrays = {
        k[len(CONFORMAL_PREFIX) :]: v.numpy()
        for k, v in tensors.items()
        if k.startswith(CONFORMAL_PREFIX)
    }
    if not arrays:
        return None
    problem = ConformalCalibration.state_problem(arrays, n_classes)
    if problem is not None:
        msg = f"{file}: the conformal calibration ({CONFORMAL_PREFIX}*) {problem}; {_FIX}."
        raise ValueError(msg)
    return ConformalCalibration.from_state(arrays, n_classes)


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
    family = strategy_family(best)
    if family.saves_model_config:
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
    pins = manifest["checkpoint"].get("files") or {}
    if "best_model.pt" in pins and pins["best_model.pt"] != manifest["checkpoint"]["sha256"]:
        msg = (
            f"{file}: field 'checkpoint.files' pins another best_model.pt than field "
            f"'checkpoint.sha256'; {_FIX}."
        )
        raise ValueError(msg)
    if not family.uses_checkpoint and not manifest.get("baseline_genes"):
        msg = f"{file}: field 'baseline_genes' is missing for strategy 'baseline'; {_FIX}."
        raise ValueError(msg)
    return manifest, digest


def _flatten(manifest: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {f"{name}.{k}": v for k, v in manifest[name].items()}


def check_tensors(file: Path, manifest: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Cross-check the weights ``file`` against the manifest before anything is built.

    Every tensor's name, shape and dtype against the manifest's record (field ``tensors``), the
    strategy's tensors, the classes, and for the probe and the baseline every shape against the
    sizes the manifest implies (classes, the checkpoint's ``embsize``, the baseline's genes).
    """
    check_tensor_record(file.parent / MANIFEST_NAME, manifest, tensors, fix=_FIX)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(CONFORMAL_PREFIX)}
    best = manifest["best_strategy"]
    n_classes = len(manifest["label_categories"])
    family = strategy_family(best)
    prefix = family.state_prefix
    stray = sorted(k for k in tensors if not k.startswith(prefix))
    if (
        stray
        or not tensors
        or (not family.saves_model_config and f"{prefix}classes" not in tensors)
    ):
        msg = (
            f"{file}: the weights hold {stray[:3] or sorted(tensors)[:3]}, not the tensors of a "
            f"{best!r} runner ({prefix}*): field 'best_strategy' does not match the weights; "
            f"{_FIX}."
        )
        raise ValueError(msg)
    if family.saves_model_config:
        return  # the recorded shapes above; the model checks its own names when it is rebuilt
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
    _check_family_shapes(file, prefix, tensors, _input_width(manifest, prefix))


#: Shapes of the tensors of the non-neural families, in named sizes: ``k`` coefficient rows,
#: ``c`` classes, ``n`` inputs (the checkpoint's embsize for the probe, the genes for the
#: baseline), ``p`` components; plain numbers are fixed sizes. Other names are refused.
_FAMILY_SHAPES: dict[str, dict[str, tuple[Any, ...]]] = {
    "probe.": {
        "coef": ("k", "n"),
        "intercept": ("k",),
        "classes": ("c",),
        "scaler_mean": ("n",),
        "scaler_scale": ("n",),
    },
    "baseline.": {
        "coef": ("k", "n"),
        "intercept": ("k",),
        "classes": ("c",),
        "scale": ("n",),
        "mean": ("n",),
        "max_value": (1,),
        "pca_components": ("p", "n"),
        "pca_mean": ("n",),
        "svd_components": ("p", "n"),  # baselines saved before centring
    },
}
_FAMILY_REQUIRED = {
    "probe.": {"coef", "intercept", "classes", "scaler_mean", "scaler_scale"},
    "baseline.": {"coef", "intercept", "classes", "scale"},
}
_INPUT_SOURCE = {
    "probe.": "the checkpoint's embsize (field 'checkpoint.args')",
    "baseline.": "the genes of field 'baseline_genes'",
}


def _input_width(manifest: Mapping[str, Any], prefix: str) -> int | None:
    """How many inputs the family's classifier reads, as the manifest says (None: unknown)."""
    if prefix == "baseline.":
        return len(manifest.get("baseline_genes") or []) or None
    recorded = manifest["checkpoint"]
    # runners saved before the model registry: scGPT's embsize (512 when args.json omits it)
    width = recorded.get("d_model") or recorded["args"].get("embsize", 512)
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def _check_family_shapes(
    file: Path, prefix: str, tensors: Mapping[str, Any], width: int | None
) -> None:
    """Every tensor of a probe or baseline has the shape and dtype the manifest implies."""
    shapes = _FAMILY_SHAPES[prefix]
    names = {k[len(prefix) :] for k in tensors}
    odd = sorted(names - set(shapes)) or sorted(_FAMILY_REQUIRED[prefix] - names)
    if odd:
        where = "holds" if odd[0] in names else "lacks"
        msg = f"{file} {where} tensor {prefix + odd[0]!r}, which a {prefix[:-1]} does not; {_FIX}."
        raise ValueError(msg)
    sizes: dict[str, int] = {} if width is None else {"n": width}
    for name, dims in shapes.items():
        if name not in names:
            continue
        tensor = tensors[prefix + name]
        shape = tuple(int(n) for n in tensor.shape)
        integer = name == "classes"
        expected = tuple(
            d if isinstance(d, int) else sizes.setdefault(d, n)
            for d, n in zip(dims, shape, strict=False)
        )
        if (
            len(shape) != len(dims)
            or shape != expected
            or tensor.dtype.is_floating_point == integer
        ):
            kind = "integer" if integer else "floating-point"
            msg = (
                f"{file}: tensor {prefix + name!r} has shape {shape} and dtype "
                f"{str(tensor.dtype).removeprefix('torch.')}; a {prefix[:-1]} needs {kind} values "
                f"of shape {_shape_text(dims, sizes)} (n: {_INPUT_SOURCE[prefix]}); {_FIX}."
            )
            raise ValueError(msg)
    if not (sizes["k"] == sizes["c"] or (sizes["k"] == 1 and sizes["c"] == 2)):
        msg = (
            f"{file}: tensor {prefix + 'coef'!r} has {sizes['k']} rows for {sizes['c']} classes "
            f"({prefix}classes); a classifier has one row per class (one for two); {_FIX}."
        )
        raise ValueError(msg)


def _shape_text(dims: tuple[Any, ...], sizes: Mapping[str, int]) -> str:
    return (
        "(" + ", ".join(str(sizes.get(d, d)) for d in dims) + ("," if len(dims) == 1 else "") + ")"
    )


def _check_base_width(file: Path, tensors: Mapping[str, Any], ckpt: ModelCheckpoint | None) -> None:
    """A probe reads the base checkpoint's ``<cls>`` features: their width must fit it."""
    coef = tensors.get("probe.coef")
    if ckpt is None or coef is None or coef.shape[1] == ckpt.d_model:
        return
    msg = (
        f"{file}: tensor 'probe.coef' reads {coef.shape[1]} features but the base checkpoint "
        f"{ckpt.path} gives {ckpt.d_model} (its model width): this runner was "
        "trained on another checkpoint. Pass the original checkpoint= when loading."
    )
    raise ValueError(msg)


def _find_base(recorded: Mapping[str, Any], checkpoint: Any, runner: Path) -> ModelCheckpoint:
    """The base checkpoint: ``checkpoint=``, else the recorded folder, else an official name.

    A recorded folder that is gone is reported with its path and the ``checkpoint=`` fix, never
    looked up by its base name (which could be any folder of that name).
    """
    # runners saved before the model registry name no model: they are scGPT's
    model = recorded.get("model") or "scgpt"
    options = recorded.get("options")
    options = model_card(model).usable_options(options) if isinstance(options, dict) else {}
    if checkpoint is not None:
        # a folder passed again still finds what the recorded options say (e.g. dictionaries)
        given = None if is_model_checkpoint(checkpoint) else options
        return resolve_model_checkpoint(checkpoint, model=model, options=given)
    folder, name = recorded["path"], recorded["name"]
    card = model_card(model)
    fix = (
        f"This runner was trained on the {card.title} checkpoint recorded in "
        f"{runner / MANIFEST_NAME} at {folder!r} (name {name!r}). If it was moved, pass its "
        f"folder (holding {', '.join(card.files or sorted(recorded.get('files') or {}))}): "
        f"AnnotationRunner.load({str(runner)!r}, "
        "checkpoint='<folder>'); its files are checked against the sha256 recorded for them."
    )
    try:
        if folder and Path(folder).is_dir():
            return resolve_model_checkpoint(folder, model=model, options=options)
        if name in card.official_names:
            return resolve_model_checkpoint(name, model=model)
    except FileNotFoundError as err:
        msg = f"{err} {fix}"
        raise FileNotFoundError(msg) from err
    msg = f"the base checkpoint folder {folder!r} no longer exists. {fix}"
    raise FileNotFoundError(msg)


def _check_pins(
    ckpt: ModelCheckpoint, recorded: Mapping[str, Any], runner: Path, checkpoint: Any
) -> None:
    """Every pinned file of ``ckpt`` has the recorded sha256 (only best_model.pt before pins)."""
    pins = recorded.get("files") or {"best_model.pt": recorded.get("sha256", "")}
    missing = sorted(set(pins) - set(ckpt.files))
    if missing:
        msg = (
            f"{runner / MANIFEST_NAME} pins {missing}, which the base checkpoint {ckpt.path} "
            f"does not have (it has {', '.join(ckpt.files)}): it is not the checkpoint this "
            f"runner was trained on. Pass the original folder, AnnotationRunner.load("
            f"{str(runner)!r}, checkpoint='<folder>')."
        )
        raise ValueError(msg)
    for name in (n for n in ckpt.files if n in pins):  # the small files first
        found = ckpt.file_sha256(name)
        if found == pins[name]:
            continue
        given = "the checkpoint= you passed" if checkpoint is not None else "the recorded one"
        msg = (
            f"base checkpoint file {ckpt.path / name} differs from the {name} this runner was "
            f"trained on (sha256 {found[:12]}... vs {str(pins[name])[:12]}... recorded in "
            f"{runner / MANIFEST_NAME}; checkpoint {given}): its predictions would change. Pass "
            f"the original folder, AnnotationRunner.load({str(runner)!r}, checkpoint='<folder>'), "
            "or verify_checkpoint=False to load against this one on purpose."
        )
        raise ValueError(msg)


def _resolve_base(
    manifest: dict[str, Any], checkpoint: Any, verify: bool, runner: Path
) -> ModelCheckpoint | None:
    if not strategy_family(manifest["best_strategy"]).uses_checkpoint:
        return None
    recorded = manifest["checkpoint"]
    ckpt = _find_base(recorded, checkpoint, runner)
    if verify:
        _check_pins(ckpt, recorded, runner, checkpoint)
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
    weights = path / manifest["weights_file"]
    check_tensors(weights, manifest, tensors)
    arguments = _constructor_arguments(manifest, file, cls)
    ckpt = _resolve_base(manifest, checkpoint, verify, path)
    _check_base_width(weights, tensors, ckpt)
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
    family = strategy_family(runner.best_strategy_)
    best = StrategyResult(
        strategy=runner.best_strategy_,
        metrics={},
        trainable_parameters=0,
        runtime_sec=0.0,
        config=manifest.get("strategy_config"),
        training=manifest.get("training"),
        model=_rebuild(family, runner.best_strategy_, tensors, manifest, ckpt, path),
    )
    conformal = _rebuild_conformal(weights, tensors, len(runner.label_categories_))
    if conformal is not None:
        best.extra["conformal"] = conformal
    runner.restore_fitted(best)
    runner.kept_pins_ = manifest.get("kept_strategies") or {}
    runner.load_options_ = (checkpoint, verify)  # how kept models are loaded on first use
    runner.kept_strategies_ = [runner.best_strategy_, *runner.kept_pins_]
    runner.final_models_ = manifest.get("final_models") or {}
    runner.runner_dir_ = path.resolve()
    runner.manifest_sha256_ = digest
    return runner


def _rebuild(
    family: Any,
    strategy: str,
    tensors: dict[str, Any],
    manifest: dict[str, Any],
    ckpt: ModelCheckpoint | None,
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
    """The runner's constructor arguments: recorded once since schema 1.1, else from params.

    ``output_dir`` and ``overwrite`` are never taken from the manifest: a loaded runner that is
    fitted again writes only where its user says now.
    """
    recorded = manifest.get("init_params")
    if isinstance(recorded, dict):
        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(recorded) - accepted)
        if unknown or not isinstance(recorded.get("label_key"), str):
            what = f"unknown arguments {unknown}" if unknown else "no string 'label_key'"
            msg = f"{file}: field 'init_params' has {what}; {_FIX}."
            raise ValueError(msg)
        return {**recorded, **{k: v for k, v in _NOT_RESTORED.items() if k in accepted}}
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
