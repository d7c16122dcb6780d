from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from scdlkit._shared.arguments import check_bool
from scdlkit._shared.provenance import check_writable, package_versions
from scdlkit._shared.slots import SPLIT_CATEGORIES, Slots, check_key_name, h5ad_safe
from scdlkit.tl._checks import check_has_cells, check_optional_str, check_str

__all__ = ["train_baseline"]


def _nan_for_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metric values for ``uns``: undefined (``None``) becomes NaN, numbers stay numbers."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        if value is None:
            out[name] = math.nan
        elif isinstance(value, int | np.integer) and not isinstance(value, bool):
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out


def train_baseline(
    adata: AnnData,
    *,
    model: str = "mlp",
    task: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    key_added: str = "baseline",
    copy: bool = False,
    **kwargs: Any,
) -> AnnData | None:
    """Train a plain deep-learning baseline (MLP, autoencoder or VAE) and write its results.

    A thin wrapper over :class:`scdlkit.TaskRunner`: fits it on ``adata`` (log-normalised
    expression standardised per gene with training-split statistics, stratified
    train/validation/test split), then writes the latent representation, the split, the
    predicted labels (classification) and the test metrics into ``adata``. Nothing is written
    when a step fails.

    Parameters
    ----------
    adata
        Cells x genes: raw counts or log-normalised values (not scaled; use ``adata.raw`` or a
        layer otherwise).
    model
        ``"mlp"`` (classifier), ``"autoencoder"`` or ``"vae"`` (representations).
    task
        ``"classification"`` or ``"representation"``; ``None`` infers it from ``model``
        (``mlp`` -> classification, otherwise representation).
    label_key
        ``adata.obs`` column with cell types: required for classification; for representation
        optional and used for stratification and the kNN/silhouette metrics. Cells with a
        missing label are left out of classification training and still get predictions.
    layer
        ``adata.layers`` key with the values; ``None`` uses ``adata.X``.
    key_added
        Prefix of the written slots: a string without ``/``, backslash or NUL (h5ad and zarr
        refuse them).
    copy
        Return a modified copy instead of writing into ``adata``.
    **kwargs
        Further :class:`scdlkit.TaskRunner` arguments: ``latent_dim``, ``hidden_dims``,
        ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``dropout``, ``kl_weight``,
        ``class_weight``, ``device``, ``precision``, ``gene_key``, ``val_size``,
        ``test_size``, ``random_state``, ``output_dir`` (saves the runner there),
        ``early_stopping_patience``, ``n_neighbors``, ``progress``.

    Returns
    -------
    AnnData or None
        ``None``, or the modified copy when ``copy=True``. Writes:

        - ``obsm[f"X_{key_added}"]``: the latent representation (float32);
        - ``obs[key_added]``: predicted labels (categorical; classification only);
        - ``obs[f"{key_added}_split"]``: ``train``/``val``/``test``/``unlabelled`` (categorical);
        - ``uns[key_added]``: ``model``, ``task``, ``params``, ``metrics`` (``{"validation",
          "test"}`` dicts; undefined values are NaN), ``label_categories``, ``history``
          (``{model: per-epoch DataFrame}``), ``split``, ``runner_dir`` (``"None"`` unless
          ``output_dir`` was given) and ``versions``. Every value survives ``write_h5ad``.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scdlkit as sck
    >>> adata = sc.datasets.pbmc68k_reduced().raw.to_adata()  # doctest: +SKIP
    >>> sck.tl.train_baseline(adata, model="mlp", label_key="bulk_labels")  # doctest: +SKIP
    >>> adata.uns["baseline"]["metrics"]["test"]["macro_f1"]  # doctest: +SKIP
    >>> sck.tl.train_baseline(adata, model="vae", key_added="vae")  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_vae")  # doctest: +SKIP
    """
    # Lazy: baselines import torch and lightning, and `import scdlkit.tl` stays free of both.
    # scdlkit.baselines brings torch and lightning_fabric: imported when the tool runs
    from scdlkit.baselines import TaskRunner

    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    check_has_cells(adata, "train_baseline")
    model = check_str("model", model)
    task = check_optional_str("task", task)
    label_key = check_optional_str("label_key", label_key)
    layer = check_optional_str("layer", layer)
    key_added = check_key_name("key_added", key_added)
    if label_key is not None and label_key in (key_added, f"{key_added}_split"):
        msg = (
            f"key_added={key_added!r} would overwrite the label column {label_key!r}; "
            "choose another key_added."
        )
        raise ValueError(msg)
    runner = TaskRunner(model=model, task=task, label_key=label_key, layer=layer, **kwargs)
    runner.fit(adata)
    predictions = runner.reference_predictions()
    split = runner.split_labels_
    history = runner.history_ if runner.history_ is not None else pd.DataFrame()
    uns = h5ad_safe(
        {
            "model": runner.model,
            "task": runner.task,
            "params": runner.params(),
            "metrics": {name: _nan_for_none(m) for name, m in runner.metrics_.items()},
            "label_categories": list(runner.label_categories_),
            "history": {runner.model: history.copy()},
            "split": runner.split_summary_,
            "runner_dir": None if runner.runner_dir_ is None else str(runner.runner_dir_),
            "versions": package_versions(),
        }
    )
    present = set(split)
    slots = Slots(
        obs={
            f"{key_added}_split": pd.Categorical(
                split, categories=[c for c in SPLIT_CATEGORIES if c in present]
            )
        },
        obsm={f"X_{key_added}": predictions["latent"].astype(np.float32)},
        uns={key_added: uns},
    )
    if runner.task == "classification":
        slots.obs[key_added] = pd.Categorical(
            predictions["labels"], categories=list(runner.label_categories_)
        )
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None
