"""The Trainer's inference: every cell's outputs in dataset order, predictions and metrics.

Under DDP each process runs a share of the batches and every process receives all rows back in
dataset order (:func:`~scdlkit.training._batching.gather_in_order`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

from scdlkit._shared.progress import tqdm
from scdlkit.training._batching import batch_indices, gather_in_order, load_batches, shard
from scdlkit.training._loss import LABELS, cross_entropy
from scdlkit.training.metrics import classification_metrics

__all__ = ["evaluate_outputs", "infer", "predict_outputs"]

_CLS_KEYS = ("logits", "latent")


def _eval_module(trainer: Any) -> Any:
    # Forward through the plain module under DDP: DDP's forward may sync buffers, a
    # collective that would hang when ranks hold different numbers of eval batches.
    if isinstance(trainer.fabric.strategy, DDPStrategy | SingleDeviceStrategy):
        return trainer.model
    return trainer._module


def infer(
    trainer: Any, dataset: Any, *, show: bool, keys: tuple[str, ...] | None = None
) -> tuple[dict[str, np.ndarray], float | None]:
    """Per-sample outputs (plus ``"labels"``) in dataset order, and the mean model loss."""
    fabric = trainer.fabric
    module = _eval_module(trainer)
    if module is trainer.model:
        fabric.to_device(trainer.model)  # the caller may have moved the model since fit
    trainer.model.eval()
    batches = batch_indices(dataset, trainer.batch_size, shuffle=False, seed=trainer.seed, epoch=0)
    mine = shard(batches, rank=fabric.global_rank, world_size=fabric.world_size, equal=False)
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    indices: list[np.ndarray] = []
    loss_totals = torch.zeros(2, dtype=torch.float64)
    precision = fabric.strategy.precision
    bar = tqdm(
        total=len(mine),
        desc="Predicting",
        unit="batch",
        disable=not (show and trainer.progress and fabric.is_global_zero),
    )
    with torch.inference_mode():
        for idx, batch in zip(mine, load_batches(dataset, mine), strict=True):
            batch = precision.convert_input(fabric.to_device(batch))
            with fabric.autocast():
                output = module(batch)
            if not isinstance(output, Mapping):
                msg = f"`model(batch)` must return a dict; got {type(output).__name__}."
                raise TypeError(msg)
            n = len(idx)
            has_loss = torch.is_tensor(output.get("loss"))
            if has_loss:
                loss_totals += torch.tensor([float(output["loss"]) * n, n], dtype=torch.float64)
            wanted = keys
            if wanted is None:
                wanted = None if has_loss or trainer.task != "classification" else _CLS_KEYS
            for key, value in output.items():
                if key == "loss" or (wanted is not None and key not in wanted):
                    continue
                if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n:
                    parts[key].append(_to_numpy(value))
            labels = batch.get(LABELS) if isinstance(batch, Mapping) else None
            if torch.is_tensor(labels):
                parts[LABELS].append(labels.detach().cpu().numpy().astype(np.int64))
            indices.append(np.asarray(idx, dtype=np.int64))
            bar.update()
    bar.close()
    out = gather_in_order(fabric, indices, parts, len(dataset))
    loss_totals = fabric.all_reduce(loss_totals.to(fabric.device), reduce_op="sum").cpu()
    mean_loss = float(loss_totals[0] / loss_totals[1]) if loss_totals[1] > 0 else None
    return out, mean_loss


def predict_outputs(trainer: Any, dataset: Any) -> dict[str, np.ndarray]:
    """:meth:`~scdlkit.training.Trainer.predict`'s result."""
    raw, _ = infer(trainer, dataset, show=True)
    raw.pop(LABELS, None)
    out: dict[str, np.ndarray] = {}
    if "logits" in raw:
        logits = raw.pop("logits").astype(np.float32)
        out["logits"] = logits
        out["probabilities"] = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        if "latent" in raw:
            out["latent"] = raw.pop("latent")
        out["label_codes"] = logits.argmax(axis=1).astype(np.int64)
    out.update(raw)
    return out


def evaluate_outputs(
    trainer: Any,
    dataset: Any,
    *,
    show: bool = True,
    keys: tuple[str, ...] | None = None,
    summary: Any = classification_metrics,
) -> dict[str, Any]:
    """Metrics of ``dataset``: ``summary(labels, probabilities)`` plus the loss."""
    raw, model_loss = infer(trainer, dataset, show=show, keys=keys)
    if model_loss is not None or trainer.task == "representation":
        result: dict[str, Any] = {}
        if "logits" in raw and LABELS in raw:
            result.update(_metrics(raw["logits"], raw[LABELS], summary))
        result["loss"] = model_loss
        result.setdefault("n_cells", len(dataset))
        return result
    if "logits" not in raw:
        msg = "task='classification' needs `model(batch)` to return 'logits'."
        raise ValueError(msg)
    if LABELS not in raw:
        msg = "`evaluate` needs labelled batches: `dataset[i]` must hold 'labels'."
        raise ValueError(msg)
    result = _metrics(raw["logits"], raw[LABELS], summary)  # checks the label codes first
    logits = torch.from_numpy(raw["logits"].astype(np.float32))
    labels = torch.from_numpy(raw[LABELS])
    weights = trainer._class_weights
    weights = None if weights is None else weights.detach().cpu()
    _, numerator, denominator = cross_entropy(logits, labels, weights)
    result["loss"] = float(numerator / denominator) if denominator > 0 else None
    return result


def _metrics(logits: np.ndarray, labels: np.ndarray, summary: Any) -> dict[str, Any]:
    probabilities = torch.softmax(torch.from_numpy(logits.astype(np.float32)), dim=1).numpy()
    return summary(labels, probabilities)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.cpu().numpy()
