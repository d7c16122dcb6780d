"""A generic supervised / self-supervised Trainer on Lightning Fabric.

The Trainer knows nothing about scGPT; any model and dataset that follow this protocol work.

Dataset protocol
----------------
- ``len(dataset)`` is the number of cells and ``dataset[i]`` returns a dict of tensors, arrays
  or numbers for cell ``i``.
- If the dataset has an attribute ``collate_fn`` it is the DataLoader's ``collate_fn`` (for
  example to pad variable-length token sequences); otherwise torch's default collate is used.
- If the dataset has a method ``get_batch(indices)`` it returns the collated batch of those
  cells directly (in-memory tensors indexed in one operation), and no DataLoader is built.
- If the dataset has a method ``batches(batch_size, *, shuffle, seed, epoch)`` returning an
  iterable of index sequences, it forms the batches (for example to group cells of similar
  length); it must yield every index exactly once. Otherwise batches are consecutive slices of
  a permutation seeded by ``(seed, epoch)`` when training, and of ``range(len(dataset))`` when
  evaluating or predicting.
- Under DDP each process takes every ``world_size``-th batch. When training, the list is
  truncated so that every process runs the same number of steps; evaluation and prediction use
  every batch and gather the rows back in dataset order.
- Classification: ``batch["labels"]`` is an integer tensor of class codes; ``-1`` marks an
  unlabelled cell, which the loss and the metrics ignore. If the dataset has a ``labels``
  attribute (``numpy.ndarray`` of codes) it is used for ``class_weight="balanced"``; otherwise
  the codes are read item by item.

Model protocol
--------------
- ``model(batch)`` takes the collated batch dict (already on the device) and returns a dict.
- Classification: ``"logits"`` of shape ``(B, C)`` and optionally ``"latent"`` of shape
  ``(B, d)``. The loss is cross-entropy over the labelled cells (class-weighted with
  ``class_weight="balanced"``).
- If the output holds ``"loss"`` (a scalar tensor), the Trainer optimises it instead of
  cross-entropy. This is how ``task="representation"`` works (autoencoders, VAEs); ``predict``
  then returns every per-sample tensor of the output (e.g. ``"latent"``, ``"reconstruction"``).
- Only parameters with ``requires_grad`` are optimised (AdamW by default, or Adam as upstream
  scGPT's fine-tuning scripts use). The Trainer calls
  ``model.train()`` and ``model.eval()``; a model may override ``train()`` to keep frozen parts
  in eval mode.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies.launchers import _SubprocessScriptLauncher
from lightning_fabric.utilities.seed import seed_everything

from scdlkit._shared.progress import tqdm
from scdlkit.training._batching import batch_indices, load_batches, shard
from scdlkit.training._checks import TRAINER_ARGUMENTS, check_arguments, check_dataset
from scdlkit.training._inference import evaluate_outputs, predict_outputs
from scdlkit.training._loss import (
    balanced_weights,
    batch_labels,
    check_label_range,
    count_classes,
    cross_entropy,
    get_logits,
    label_counts,
)
from scdlkit.training._precision import resolve_devices, resolve_precision
from scdlkit.training._schedule import (
    MONITORS,
    Periods,
    Selection,
    build_optimizer,
    diverged,
    lr_factor,
    set_lr,
    warmup_steps,
)
from scdlkit.training.metrics import classification_metrics, monitor_metrics

__all__ = ["Trainer"]

logger = logging.getLogger("scdlkit")

_HISTORY_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "lr",
    "seconds",
]


class Trainer:
    """Fit, evaluate and apply a model that follows the scdlkit batch/output protocol.

    Runs on Lightning Fabric, so CPU, one GPU, several GPUs (DDP) or several nodes are a matter
    of ``accelerator``, ``devices``, ``strategy`` and ``num_nodes``. See the module docstring of
    :mod:`scdlkit.training._trainer` for the protocol that datasets and models follow.

    Parameters
    ----------
    model
        A :class:`torch.nn.Module` whose ``forward(batch)`` returns a dict (``"logits"``,
        optionally ``"latent"``, or a scalar ``"loss"``).
    task
        ``"classification"`` (cross-entropy on ``batch["labels"]``, unless the model returns
        ``"loss"``) or ``"representation"`` (the model must return ``"loss"``).
    batch_size
        Cells per batch (per process under DDP).
    epochs
        Maximum number of passes over the training data.
    max_steps
        If given, training ends after this many optimiser steps (mid-epoch if need be), even if
        ``epochs`` would run longer. ``None``: ``epochs`` alone sets the length.
    eval_every
        Evaluation period on large data: when an epoch holds more than ``eval_every`` optimiser
        steps, the validation data is evaluated (and the best weights, early stopping and the
        learning-rate decay updated) every ``eval_every`` steps instead of once per epoch.
        ``None``, or epochs of at most ``eval_every`` steps: once per epoch.
    lr
        Peak learning rate.
    head_lr
        Peak learning rate of a freshly initialised head, for models with a ``head_parameters()``
        method (the scGPT annotation model's classifier); ``None`` trains it at ``lr``. The
        schedule scales both rates alike.
    weight_decay
        Weight decay: decoupled under ``"adamw"``, an L2 term added to the gradient under
        ``"adam"`` (as :class:`torch.optim.Adam` does).
    optimizer
        ``"adamw"`` (default; :class:`torch.optim.AdamW`), ``"adam"`` (:class:`torch.optim.Adam`,
        the optimiser of upstream scGPT's fine-tuning tutorials) or ``"adafactor"``
        (:class:`torch.optim.Adafactor`, the IA3 paper's; ``adam_eps`` does not apply).
    adam_eps
        The ``eps`` term of Adam/AdamW's denominator. Default ``1e-8`` (PyTorch's). Upstream scGPT
        uses ``1e-4`` when it trains under fp16 mixed precision, which damps the update of
        parameters whose squared-gradient average is tiny.
    warmup
        Linear learning-rate warm-up from ~0 to ``lr``: a fraction of the planned total steps
        (float in ``[0, 1)``) or a number of steps (int).
    lr_decay
        If given, the learning rate is multiplied by this factor after every evaluation period
        (an epoch, or ``eval_every`` steps on large data; StepLR with step size 1 per epoch is
        the published scGPT recipe's, with 0.9). ``None`` keeps it constant.
    grad_clip
        Maximum gradient norm; ``None`` disables clipping.
    early_stopping_patience
        Stop after this many evaluation periods (epochs, or ``eval_every`` steps on large data)
        without improvement of ``monitor``; ``None`` runs all epochs.
    monitor
        ``"val_loss"`` (lower is better) or ``"val_macro_f1"`` (higher is better). Without a
        validation set the training loss is monitored instead.
    class_weight
        ``None`` or ``"balanced"``: weight classes by ``n / (k * count)`` computed from the
        training labels (``k`` classes present; classes absent from training get weight 1).
        The validation loss and :meth:`evaluate`'s ``"loss"`` use the same weighted criterion.
    precision
        ``"auto"`` (``"bf16-mixed"`` where the device has native bf16: CUDA GPUs from Ampere on,
        CPUs with AMX or AVX512-BF16; else ``"32-true"``), ``"fp32"``, ``"bf16"``, or any
        Lightning Fabric precision string.
    accelerator
        Lightning Fabric accelerator (``"auto"``, ``"cpu"``, ``"cuda"``, ...).
    devices
        Lightning Fabric devices. ``"auto"`` means one device unless ``strategy`` or
        ``num_nodes`` asks for a distributed run (then every visible device).
    strategy
        Lightning Fabric strategy, e.g. ``"ddp"`` (re-launches the calling script once per
        device, so run it as a script) or ``"ddp_spawn"``. Single-device and DDP strategies are
        supported; sharded strategies (FSDP, DeepSpeed) are not.
    num_nodes
        Number of nodes for multi-node DDP.
    seed
        Seeds Python, NumPy and torch at the start of :meth:`fit` and the batch order of every
        epoch; with the same seed two fits on CPU are identical.
    num_threads
        CPU threads of each operation (``torch.set_num_threads``) while fitting, predicting and
        evaluating, restored afterwards; ``None`` keeps torch's setting. One thread suits a small
        model such as a head on cached features: its operations are too small to share, and on
        a busy machine every shared operation waits for a free core (a head fit was 30 times
        slower with 2 threads than with 1 on 2 cores at a load average of 4.5).
    progress
        Show tqdm progress bars (on the main process only).
    keep
        ``"best"`` (default): restore the weights of the period with the best ``monitor``
        value at the end. ``"last"``: keep the weights of the last step, e.g. to train exactly
        a given number of steps without validation data.

    Attributes
    ----------
    history_
        :class:`pandas.DataFrame`, one row per evaluation period (per epoch, unless epochs hold
        more than ``eval_every`` steps): ``epoch`` (1-based, the epoch the period ended in),
        ``step`` (optimiser steps taken so far), ``train_loss`` (over the period),
        ``val_loss``, ``val_accuracy``, ``val_macro_f1`` (NaN without validation data), ``lr``
        (of the period's last step) and ``seconds``.
    best_epoch_
        The epoch whose weights were restored at the end of :meth:`fit` (the epoch the best
        period ended in).
    best_step_
        The optimiser step after which those weights were taken.
    trainable_parameters_
        Number of parameters with ``requires_grad``.
    fabric
        The :class:`lightning_fabric.Fabric` object.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import scdlkit as sck
    >>> class Data(torch.utils.data.Dataset):
    ...     def __init__(self):
    ...         g = torch.Generator().manual_seed(0)
    ...         self.labels = torch.arange(64) % 2
    ...         self.x = torch.randn(64, 4, generator=g) + 3 * self.labels[:, None]
    ...
    ...     def __len__(self):
    ...         return 64
    ...
    ...     def __getitem__(self, i):
    ...         return {"x": self.x[i], "labels": self.labels[i]}
    >>> class Model(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(4, 2)
    ...
    ...     def forward(self, batch):
    ...         return {"logits": self.net(batch["x"])}
    >>> _ = torch.manual_seed(0)
    >>> trainer = sck.Trainer(Model(), batch_size=16, epochs=20, lr=1e-2, progress=False)
    >>> trainer = trainer.fit(Data())
    >>> trainer.evaluate(Data())["accuracy"] > 0.9
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: str = "classification",
        *,
        batch_size: int = 64,
        epochs: int = 10,
        max_steps: int | None = None,
        eval_every: int | None = None,
        lr: float = 1e-4,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        adam_eps: float = 1e-8,
        warmup: float | int = 0.0,
        lr_decay: float | None = None,
        grad_clip: float | None = 1.0,
        early_stopping_patience: int | None = None,
        monitor: str = "val_loss",
        class_weight: str | None = None,
        precision: str = "auto",
        accelerator: Any = "auto",
        devices: Any = "auto",
        strategy: Any = "auto",
        num_nodes: int = 1,
        seed: int = 0,
        num_threads: int | None = None,
        progress: bool = True,
        keep: str = "best",
    ) -> None:
        # every argument checked (and made canonical) before Fabric or any work
        arguments = check_arguments(
            TRAINER_ARGUMENTS, {k: v for k, v in locals().items() if k != "self"}
        )
        if task == "representation" and monitor == "val_macro_f1":
            msg = "`monitor='val_macro_f1'` needs task='classification'; use monitor='val_loss'."
            raise ValueError(msg)
        if task == "representation" and class_weight is not None:
            msg = "`class_weight` applies to task='classification' only; leave it as None."
            raise ValueError(msg)
        self.model = model
        self.task = task
        self.batch_size = arguments["batch_size"]
        self.epochs = arguments["epochs"]
        self.max_steps = arguments["max_steps"]
        self.eval_every = arguments["eval_every"]
        self.lr = arguments["lr"]
        self.head_lr = arguments["head_lr"]
        self.weight_decay = arguments["weight_decay"]
        self.optimizer = optimizer
        self.adam_eps = arguments["adam_eps"]
        self.warmup = arguments["warmup"]
        self.lr_decay = arguments["lr_decay"]
        self.grad_clip = arguments["grad_clip"]
        self.early_stopping_patience = arguments["early_stopping_patience"]
        self.monitor = monitor
        self.class_weight = class_weight
        self.seed = arguments["seed"]
        self.num_threads = arguments["num_threads"]
        self.progress = arguments["progress"]
        self.keep = arguments["keep"]
        self.precision = resolve_precision(arguments["precision"], accelerator=accelerator)
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=resolve_devices(devices, strategy=strategy, num_nodes=arguments["num_nodes"]),
            strategy=strategy,
            num_nodes=arguments["num_nodes"],
            precision=self.precision,
        )
        self.history_: pd.DataFrame | None = None
        self.best_epoch_: int | None = None
        self.best_step_: int | None = None
        self._module: Any = None  # the Fabric-wrapped model, set up on first use
        self._launched = False
        self._class_weights: torch.Tensor | None = None

    def __repr__(self) -> str:
        fitted = f", best_epoch_={self.best_epoch_}" if self.best_epoch_ is not None else ""
        return (
            f"Trainer({type(self.model).__name__}, task={self.task!r}, epochs={self.epochs}, "
            f"lr={self.lr:g}, precision={self.precision!r}{fitted})"
        )

    @property
    def trainable_parameters_(self) -> int:
        """Number of model parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ public API

    def fit(self, train: Any, val: Any | None = None) -> Trainer:
        """Train the model, then restore the weights of the best epoch.

        Parameters
        ----------
        train
            Training dataset following the protocol of :mod:`scdlkit.training._trainer`.
        val
            Optional validation dataset; evaluated after every evaluation period (an epoch, or
            ``eval_every`` steps) for ``monitor`` and early stopping. Without it the best period
            is the one with the lowest training loss.

        Returns
        -------
        Trainer
            ``self``, with ``history_`` and ``best_epoch_`` set.

        Raises
        ------
        ValueError
            :class:`~scdlkit.training.TrainingDivergedError` when the training loss or the
            gradient norm becomes NaN or infinite (the learning rate is too high); it names the
            rates in use and a smaller one to try.

        Examples
        --------
        >>> trainer = sck.Trainer(model, epochs=5).fit(train_ds, val_ds)  # doctest: +SKIP
        >>> trainer.history_[["epoch", "val_loss"]]  # doctest: +SKIP
        """
        check_dataset(train, "train")
        if val is not None:
            check_dataset(val, "val")
        if self.trainable_parameters_ == 0:
            msg = "`model` has no parameters with requires_grad=True; unfreeze something to train."
            raise ValueError(msg)
        if self._spawns():
            result = self.fabric.launch(_in_worker, self, "_fit_and_state", (train, val))
            self._restore(result["state"])
            self.history_ = result["history"]
            self.best_epoch_ = result["best_epoch"]
            self.best_step_ = result["best_step"]
            weights = result["class_weights"]
            self._class_weights = None if weights is None else torch.from_numpy(weights)
            return self
        self._ready()
        with intra_op_threads(self.num_threads):
            self._fit(train, val)
        return self

    def predict(self, dataset: Any) -> dict[str, np.ndarray]:
        """Run the model over a dataset and collect its per-cell outputs.

        Parameters
        ----------
        dataset
            Dataset following the protocol; labels are not needed.

        Returns
        -------
        dict
            Rows in dataset order. For classification: ``"logits"`` (``(n, C)`` float32),
            ``"probabilities"`` (softmax of the logits), ``"latent"`` (``(n, d)``, if the model
            returns it) and ``"label_codes"`` (argmax, int64). When the model returns
            ``"loss"`` (``task="representation"``), every per-sample tensor it returns, as
            arrays (plus ``"probabilities"``/``"label_codes"`` if it returns ``"logits"``).
            Under DDP every process receives the full result.

        Examples
        --------
        >>> out = trainer.predict(query_ds)  # doctest: +SKIP
        >>> out["probabilities"].shape  # doctest: +SKIP
        (1000, 8)
        """
        check_dataset(dataset, "dataset")
        return self._dispatch("_predict", dataset)

    def evaluate(self, dataset: Any) -> dict[str, Any]:
        """Metrics of the model on a labelled dataset.

        Parameters
        ----------
        dataset
            Dataset following the protocol; for classification its batches carry
            ``"labels"`` (``-1`` = unlabelled, ignored).

        Returns
        -------
        dict
            For classification the output of
            :func:`~scdlkit.training.metrics.classification_metrics` (``accuracy``,
            ``macro_f1``, ``balanced_accuracy``, ``weighted_f1``, ``auroc_ovr``, ``n_cells``)
            plus ``"loss"`` (the training criterion averaged over labelled cells). For a model
            that returns ``"loss"``: ``"loss"`` (mean over cells) and ``"n_cells"``. Undefined
            values are ``None``.

        Examples
        --------
        >>> trainer.evaluate(test_ds)["macro_f1"]  # doctest: +SKIP
        0.93
        """
        check_dataset(dataset, "dataset")
        return self._dispatch("_evaluate", dataset)

    # ------------------------------------------------------------------ processes

    def _spawns(self) -> bool:
        # ddp_spawn / ddp_fork / XLA must run the work inside `fabric.launch(function)`
        launcher = self.fabric.strategy.launcher
        return launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher)

    def _ready(self) -> None:
        if not self._launched:
            self.fabric.launch()  # with strategy="ddp" this starts the other processes
            self._launched = True
        self._setup_module()

    def _setup_module(self) -> Any:
        if self._module is None:
            self._module = self.fabric.setup_module(self.model)
        return self._module

    def _dispatch(self, method: str, *args: Any) -> Any:
        if self._spawns():
            return self.fabric.launch(_in_worker, self, method, args)
        self._ready()
        with intra_op_threads(self.num_threads):
            return getattr(self, method)(*args)

    # ------------------------------------------------------------------ training

    def _fit_and_state(self, train: Any, val: Any) -> dict[str, Any]:
        self._fit(train, val)
        # numpy, not tensors: torch would share tensor storage with the parent through file
        # descriptors, and the worker exits before the parent reads them
        weights = self._class_weights
        return {
            "state": {k: v.numpy() for k, v in self._snapshot().items()},
            "history": self.history_,
            "best_epoch": self.best_epoch_,
            "best_step": self.best_step_,
            "class_weights": None if weights is None else weights.cpu().numpy(),
        }

    def _fit(self, train: Any, val: Any | None) -> None:
        fabric = self.fabric
        seed_everything(self.seed, verbose=False)
        module = self._setup_module()
        optimizer = fabric.setup_optimizers(
            build_optimizer(
                module,
                self.model,
                optimizer=self.optimizer,
                lr=self.lr,
                head_lr=self.head_lr,
                weight_decay=self.weight_decay,
                eps=self.adam_eps,
            )
        )
        self._class_weights = None
        counts = label_counts(train) if self.class_weight == "balanced" else None
        first = self._epoch_batches(train, 0)
        periods = Periods.plan(len(first), eval_every=self.eval_every, max_steps=self.max_steps)
        planned = self.epochs * len(first)
        if self.max_steps is not None:
            planned = min(planned, self.max_steps)
        warmup = warmup_steps(self.warmup, planned)
        direction = "min" if val is None else MONITORS[self.monitor]
        monitored = "train_loss" if val is None else self.monitor
        if val is None and self.monitor != "val_loss":
            logger.info("No validation data: selecting the best epoch by train_loss.")

        # a grad scaler (fp16) makes infinite gradients on purpose and skips those steps
        check_norm = getattr(fabric.strategy.precision, "scaler", None) is None
        run = _Run(Selection(direction, self.early_stopping_patience), monitored, fabric.device)
        bar = tqdm(
            total=planned,
            desc="Training",
            unit="step",
            disable=not (self.progress and fabric.is_global_zero),
        )
        for epoch in range(1, self.epochs + 1):
            self.model.train()
            batches = first if epoch == 1 else self._epoch_batches(train, epoch - 1)
            for indices, batch in zip(batches, load_batches(train, batches), strict=True):
                batch = fabric.to_device(batch)
                output = module(batch)
                if run.step == 0 and "loss" not in output:
                    check_label_range(train, count_classes(output))
                    if counts is not None:
                        self._class_weights = balanced_weights(counts, count_classes(output))
                loss, numerator, denominator = self._loss(output, batch, len(indices))
                optimizer.zero_grad(set_to_none=True)
                fabric.backward(loss)
                if self.grad_clip is not None:
                    norm = fabric.clip_gradients(
                        module, optimizer, max_norm=self.grad_clip, error_if_nonfinite=False
                    )
                    # the same sync clip_grad_norm_'s own check made; equal on every DDP rank
                    if check_norm and not torch.isfinite(norm):
                        raise diverged("gradient norm", epoch, self.lr, self.head_lr)
                factor = lr_factor(run.step, len(run.rows), warmup, self.lr_decay)
                set_lr(optimizer, factor)
                optimizer.step()
                run.add_step(numerator, denominator, lr=self.lr * factor)
                bar.update()
                if periods.ends_after(run.step):
                    self._end_period(run, val, epoch)
                    if run.selection.exhausted or periods.done(run.step):
                        break
            if run.selection.exhausted or periods.done(run.step):
                break
            if periods.by_epoch:
                self._end_period(run, val, epoch)
                if run.selection.exhausted:
                    break
        if run.period_steps:  # the run's last, shorter period of eval_every steps
            self._end_period(run, val, epoch)
        bar.close()
        self._finish(run)

    def _epoch_batches(self, train: Any, epoch_index: int) -> list[list[int]]:
        """This process's batches of training cells in epoch ``epoch_index`` (0-based)."""
        fabric = self.fabric
        batches = batch_indices(
            train, self.batch_size, shuffle=True, seed=self.seed, epoch=epoch_index
        )
        mine = shard(batches, rank=fabric.global_rank, world_size=fabric.world_size, equal=True)
        if not mine:
            msg = (
                f"`train` has {len(train)} cells, too few for batch_size={self.batch_size} "
                f"on {fabric.world_size} processes; lower `batch_size` or `devices`."
            )
            raise ValueError(msg)
        return mine

    def _end_period(self, run: _Run, val: Any | None, epoch: int) -> None:
        """One evaluation period done: its row, the best weights so far, the stopping rule."""
        totals = self.fabric.all_reduce(run.totals, reduce_op="sum")
        if totals[2] > 0:  # summed over ranks, so every rank raises
            raise diverged("training loss", epoch, self.lr, self.head_lr)
        row: dict[str, Any] = {"epoch": epoch, "step": run.step, "train_loss": _ratio(totals)}
        row.update(self._validate(val) if val is not None else {})
        row["lr"] = run.lr
        row["seconds"] = time.perf_counter() - run.started
        run.rows.append(row)
        if run.selection.update(row.get(run.monitored)):
            run.best_state, run.best_epoch, run.best_step = self._snapshot(), epoch, run.step
        logger.debug("epoch %d, step %d: %s", epoch, run.step, row)
        if run.selection.exhausted:
            logger.info(
                "Early stopping after step %d (epoch %d): %s did not improve for %d evaluations.",
                run.step,
                epoch,
                run.monitored,
                run.selection.stale,
            )
        run.new_period()
        self.model.train()  # the evaluation left it in eval mode

    def _finish(self, run: _Run) -> None:
        """Restore the best period's weights and record the history."""
        if self.keep == "last" or run.best_state is None:
            if self.keep == "best":
                logger.warning(
                    "%s was never finite; keeping the weights of the last epoch.", run.monitored
                )
            run.best_epoch, run.best_step = run.rows[-1]["epoch"], run.rows[-1]["step"]
        else:
            self._restore(run.best_state)
        self.model.eval()
        self.history_ = pd.DataFrame(run.rows).reindex(columns=_HISTORY_COLUMNS)
        self.history_["epoch"] = self.history_["epoch"].astype(int)
        self.history_["step"] = self.history_["step"].astype(int)
        self.best_epoch_ = int(run.best_epoch)
        self.best_step_ = int(run.best_step)
        if self.fabric.is_global_zero:
            best = run.selection.best
            logger.info(
                "Trained %d steps (%d evaluations); restored step %d, epoch %d (%s=%.4g).",
                run.step,
                len(run.rows),
                self.best_step_,
                self.best_epoch_,
                run.monitored,
                math.nan if best is None else best,
            )

    def _loss(
        self, output: Any, batch: Any, batch_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss to optimise, plus numerator/denominator for an exact epoch average."""
        if not isinstance(output, Mapping):
            msg = f"`model(batch)` must return a dict; got {type(output).__name__}."
            raise TypeError(msg)
        if "loss" in output:
            loss = output["loss"]
            if not (torch.is_tensor(loss) and loss.numel() == 1):
                msg = "The model's output 'loss' must be a scalar tensor."
                raise ValueError(msg)
            loss = loss.reshape(())
            n = torch.tensor(float(batch_len), device=loss.device)
            return loss, loss.float() * n, n
        if self.task == "representation":
            msg = "task='representation' needs `model(batch)` to return a scalar 'loss'."
            raise ValueError(msg)
        logits = get_logits(output)
        labels = batch_labels(batch)
        return cross_entropy(logits.float(), labels, self._class_weights)

    def _validate(self, val: Any) -> dict[str, float]:
        # accuracy and macro-F1 alone, in NumPy: the full metrics (AUROC, scikit-learn's
        # parameter checks) cost about a third of a second per call, every period
        metrics = self._evaluate(val, show=False, keys=("logits",), summary=monitor_metrics)
        return {
            "val_loss": _nan_if_none(metrics.get("loss")),
            "val_accuracy": _nan_if_none(metrics.get("accuracy")),
            "val_macro_f1": _nan_if_none(metrics.get("macro_f1")),
        }

    def _trainable_items(self) -> list[tuple[str, torch.Tensor]]:
        params = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
        return params + list(self.model.named_buffers())

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().to("cpu", copy=True) for k, t in self._trainable_items()}

    def _restore(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in self._trainable_items():
                tensor.copy_(torch.as_tensor(state[key]))

    # ------------------------------------------------------------------ inference

    def _predict(self, dataset: Any) -> dict[str, np.ndarray]:
        return predict_outputs(self, dataset)

    def _evaluate(
        self,
        dataset: Any,
        *,
        show: bool = True,
        keys: tuple[str, ...] | None = None,
        summary: Any = classification_metrics,
    ) -> dict[str, Any]:
        """Metrics of ``dataset``: ``summary(labels, probabilities)`` plus the loss."""
        return evaluate_outputs(self, dataset, show=show, keys=keys, summary=summary)


def _in_worker(fabric: Fabric, trainer: Trainer, method: str, args: tuple[Any, ...]) -> Any:
    """Body of a spawned/forked process: set up the module there and run ``method``."""
    trainer.fabric = fabric
    trainer._launched = True
    trainer._setup_module()
    with intra_op_threads(trainer.num_threads):
        return getattr(trainer, method)(*args)


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` (``None``: unchanged) inside the block."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- helpers


class _Run:
    """The state of one :meth:`Trainer.fit`: steps, the current period's sums, the rows so far
    and the best weights."""

    def __init__(self, selection: Selection, monitored: str, device: Any) -> None:
        self.selection = selection
        self.monitored = monitored
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.new_period()

    def new_period(self) -> None:
        # summed loss, labelled weight, steps whose loss was not finite
        self.totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        self.period_steps = 0
        self.lr = math.nan
        self.started = time.perf_counter()

    def add_step(self, numerator: torch.Tensor, denominator: torch.Tensor, *, lr: float) -> None:
        numerator = numerator.detach().double()
        nonfinite = (~numerator.isfinite()).double()
        self.totals += torch.stack([numerator, denominator.detach().double(), nonfinite])
        self.step += 1
        self.period_steps += 1
        self.lr = lr


def _ratio(totals: torch.Tensor) -> float:
    return float(totals[0] / totals[1]) if float(totals[1]) > 0 else math.nan


def _nan_if_none(value: Any) -> float:
    return math.nan if value is None else float(value)
