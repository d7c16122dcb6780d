from __future__ import annotations

import os
from typing import Any

import numpy as np
from anndata import AnnData

from scdlkit._shared.arguments import check_bool, check_int, check_optional_int
from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import Slots, check_key_name, h5ad_safe
from scdlkit.tl._checks import (
    check_checkpoint,
    check_device,
    check_has_cells,
    check_optional_str,
    check_random_state,
    check_runner,
)
from scdlkit.tl._runner_source import resolve_runner

__all__ = ["annotation_markers"]


def annotation_markers(
    adata: AnnData,
    *,
    key: str = "scgpt_annotation",
    runner: str | os.PathLike | Any = None,
    n_genes: int = 20,
    n_steps: int = 20,
    max_cells_per_label: int | None = 500,
    checkpoint: str | os.PathLike | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """The genes behind each predicted label (CellTypist's ``extract_top_markers``, for scGPT too).

    Every argument is checked before any work, and the results are written only once all are
    computed, so a call that fails leaves ``adata`` exactly as it was.

    For each label of ``adata.obs[key]``, genes are ranked by how much they push the cells
    predicted as that label towards it:

    - scGPT strategies (``frozen_probe``, ``head``, ``full_finetune``, ``lora``, ...): integrated
      gradients of a contrast, the label's logit minus the mean logit of the other classes
      (what sets the label apart; softmax ignores what moves every logit alike), over each gene
      token's input embedding (zero baseline, ``n_steps`` points), averaged over the cells
      predicted as that label (a gene not among a cell's tokens counts as zero). For
      ``frozen_probe`` the probe's inputs are ``<cls>`` dimensions, not genes, so its
      coefficients name no gene: the gradients go through the frozen encoder to the gene
      tokens instead.
    - ``baseline`` (logistic regression on scaled log-expression): the class coefficient times
      the gene's mean scaled expression in the label's cells minus its mean over all cells, which
      is integrated gradients from the average cell, exact for a linear model.

    Only genes that point up are kept (CellTypist's ``only_positive``): a positive score *and* a
    higher mean log-normalised expression in the label's cells than in all the other cells of
    ``adata`` (``expression_difference``, reported). A gene lower in the label's cells is never
    a marker, even when the model reads its absence (for the baseline, a negative coefficient
    times a negative difference gives a positive score).

    See :doc:`/label_transfer` for why these methods.

    Parameters
    ----------
    adata
        Cells annotated by :func:`scdlkit.tl.annotate` or :func:`scdlkit.tl.adapt_annotation`
        (in memory or backed). Cells labelled ``"Unknown"`` or with no label are not used.
    key
        The ``key_added`` of that call: reads ``obs[key]`` and ``uns[key]["runner_dir"]``.
    runner
        The fitted :class:`scdlkit.AnnotationRunner`, its folder, or an annotation record;
        default: the record ``uns[key]``, whose folder is loaded only if its manifest still has
        the sha256 recorded (as :func:`scdlkit.tl.annotate` does), so the markers explain the
        model that gave the labels. A runner that is not fitted is refused before any work.
    n_genes
        Genes kept per label.
    n_steps
        Integration points (scGPT strategies); more is more exact and slower (the cost is
        ``n_steps`` forward and backward passes per cell).
    max_cells_per_label
        Cells per label used (a seeded random subset above it), which bounds the cost on large
        data (scGPT strategies); ``None`` uses every cell.
    checkpoint, device
        Used when loading the runner from a folder.
    gene_key, layer
        Where gene symbols and values are (default: as for the reference).
    batch_size
        Cells per forward/backward pass (default: the runner's); memory is that of one batch.
    chunk_size
        Cells read and tokenised at a time (default: all of an in-memory AnnData, 50,000 of a
        backed one).
    random_state
        Seeds the subset of ``max_cells_per_label``.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
        ``None``, or the copy when ``copy=True``. Writes ``uns[f"{key}_markers"]``: a
        DataFrame with columns ``label``, ``rank`` (1 = strongest), ``gene``, ``score`` and
        ``expression_difference`` (mean log-normalised expression in the label's cells minus
        that in the other cells; always positive), and ``uns[f"{key}_markers_params"]``
        (method, target, direction and settings).

    Examples
    --------
    >>> sck.tl.annotate(query, runner_dir)  # doctest: +SKIP
    >>> sck.tl.annotation_markers(query)  # doctest: +SKIP
    >>> query.uns["scgpt_annotation_markers"].query("rank <= 3")  # doctest: +SKIP
    """
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import (
        attribution_method,
        class_gene_scores,
        expression_difference,
        top_genes,
    )

    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    check_has_cells(adata, "annotation_markers")
    key = check_key_name("key", key)
    if runner is not None:
        runner = check_runner(runner, records=True)
    n_genes = check_int("n_genes", n_genes, min_value=1)
    n_steps = check_int("n_steps", n_steps, min_value=1)
    max_cells_per_label = check_optional_int(
        "max_cells_per_label", max_cells_per_label, min_value=1
    )
    checkpoint = check_checkpoint("checkpoint", checkpoint, optional=True)
    gene_key = check_optional_str("gene_key", gene_key)
    layer = check_optional_str("layer", layer)
    device = check_device(device)
    batch_size = check_optional_int("batch_size", batch_size, min_value=1)
    chunk_size = check_optional_int("chunk_size", chunk_size, min_value=1)
    random_state = check_random_state(random_state)
    if key not in adata.obs.columns:
        msg = (
            f"adata.obs[{key!r}] not found: label the cells first with sck.tl.annotate(adata, "
            f"runner, key_added={key!r}) (or sck.tl.adapt_annotation)."
        )
        raise KeyError(msg)
    record = None
    if runner is None:
        runner = record = _annotation_record(adata, key)
    runner = resolve_runner(runner, checkpoint, device)

    categories = list(runner.label_categories_)
    labels = adata.obs[key].astype(object).to_numpy()
    index = {c: i for i, c in enumerate(categories)}
    codes = np.asarray([index.get(str(v), -1) for v in labels], dtype=np.int64)
    if not (codes >= 0).any():
        msg = (
            f"no cell of adata.obs[{key!r}] holds one of the runner's labels "
            f"({', '.join(categories[:5])}, ...): was it annotated with this runner?"
        )
        raise ValueError(msg)
    # the model that labelled the cells (annotate(strategy=) with a keep="all" runner)
    strategy = str(record.get("strategy", runner.best_strategy_)) if record else None
    strategy = strategy if strategy in runner.kept_strategies_ else runner.best_strategy_
    linear = attribution_method(strategy) == "linear_attribution"
    difference = expression_difference(
        adata,
        codes,
        len(categories),
        gene_key=runner.gene_key if gene_key is None else gene_key,
        layer=runner.layer if layer is None else layer,
    )
    if max_cells_per_label is not None and not linear:
        codes = _subsample(codes, max_cells_per_label, random_state)
    scores = class_gene_scores(
        runner,
        adata,
        codes,
        gene_key=gene_key,
        layer=layer,
        n_steps=n_steps,
        batch_size=batch_size,
        chunk_size=chunk_size,
        progress=getattr(runner, "progress", False),
        strategy=strategy,
    )
    markers = top_genes(scores, n_genes, difference)
    params = {
        "strategy": strategy,
        "method": attribution_method(strategy),
        "target": "logit" if linear else "logit minus mean of the other logits",
        "direction": "up: positive score and higher mean log-expression in the label's cells",
        "n_genes": n_genes,
        "n_steps": n_steps,
        "max_cells_per_label": max_cells_per_label,
        "n_cells_used": int((codes >= 0).sum()),
    }
    slots = Slots(uns={f"{key}_markers": markers, f"{key}_markers_params": h5ad_safe(params)})
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None


def _annotation_record(adata: AnnData, key: str) -> Any:
    """``uns[key]``, the record of the annotation (its runner folder and manifest sha256), or an
    error saying to pass ``runner=``."""
    uns = adata.uns.get(key)
    if not hasattr(uns, "get") or "runner_dir" not in uns:
        msg = (
            f"adata.uns[{key!r}]['runner_dir'] not found: pass runner= (a fitted "
            "AnnotationRunner or the folder it was saved to)."
        )
        raise KeyError(msg)
    if str(uns["runner_dir"]) == "None":
        msg = (
            f"adata.uns[{key!r}] records a runner that was never saved (runner_dir 'None'): "
            "pass runner= (the fitted AnnotationRunner itself, or the folder it was saved to)."
        )
        raise KeyError(msg)
    return uns


def _subsample(codes: np.ndarray, limit: int, random_state: int) -> np.ndarray:
    """Keep at most ``limit`` cells per code (seeded); the others get -1."""
    rng = np.random.default_rng(random_state)
    out = np.full_like(codes, -1)
    for code in np.unique(codes[codes >= 0]):
        cells = np.flatnonzero(codes == code)
        if len(cells) > limit:
            cells = np.sort(rng.choice(cells, size=limit, replace=False))
        out[cells] = code
    return out
