"""Which genes drive each predicted label: gene scores per class for every strategy family.

Only genes that point **up** are markers (as CellTypist's ``only_positive``): a gene is kept for a
class when its score is positive *and* its mean log-normalised expression is higher in the cells
predicted as that class than in the other cells (:func:`expression_difference`, reported beside
the score). A positive score alone is not enough: a gene lower in the class can push towards it
when the model reads its absence.

scGPT strategies (``frozen_probe``, ``head``, ``full_finetune`` and the PEFT methods):
**integrated gradients** (Sundararajan et al., 2017) of a **contrast**: the class's logit minus
the mean logit of the other classes (the model's classes; for ``frozen_probe``, those its probe
saw). Softmax probabilities do not change when every logit moves together, so the raw logit
explains in part what raises all classes alike; the contrast explains what sets the class apart.
A gene token's input is the sum of its gene embedding and its value embedding; the baseline sets
every gene token's input to zero (no gene, no value) while ``<cls>`` and the attention mask stay
as they are. Its attribution is ``sum_d (x - x0)_d * mean_alpha dtarget/dx_d`` along the straight
path from the baseline to the input (midpoint rule, ``n_steps`` points). Why this method: it
satisfies completeness (a cell's attributions add up to ``target(x) - target(baseline)``,
tested), it needs only gradients (no extra model), it is exact in the limit of steps, and
attention weights are known not to explain predictions. Attributions are averaged per class over
the cells predicted as that class, a gene absent from a cell's tokens counting as zero. Batched:
memory is that of one training step of ``batch_size`` cells, whatever the number of cells.

Linear strategies on expression (``baseline``): for a linear logit integrated gradients are
exact without integration: ``coef_cg * (x_g - x0_g)`` on the scaled genes. The baseline ``x0`` is
the mean cell of the data scored, so genes high in every cell (``FTL``, ribosomal genes) do not
top every class; the score of gene ``g`` for class ``c`` is
``coef_cg * (mean over cells predicted c of x_g - mean over all cells of x_g)``, which is
positive also when both factors are negative (a gene lower in the class, with a negative
coefficient): the expression filter above leaves those out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from scdlkit.foundation.strategies import strategy_family

__all__ = [
    "attribution_method",
    "class_gene_scores",
    "contrast",
    "expression_difference",
    "integrated_gradients",
    "top_genes",
]

DEFAULT_STEPS = 20


def contrast(logits: torch.Tensor, target: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per cell, ``logits[target]`` minus the mean logit of the other classes in ``classes``.

    ``classes`` is a boolean mask of the classes that count (the model's; a probe that never saw
    a class gives it no logit worth comparing to). With a single class, the logit itself.
    """
    rows = torch.arange(len(target), device=target.device)
    own = logits[rows, target]
    counted = classes.to(device=logits.device, dtype=logits.dtype)
    others = (logits * counted).sum(dim=1) - own * counted[target]
    n_others = counted.sum() - counted[target]
    return own - others / n_others.clamp(min=1.0)


def integrated_gradients(
    encoder: Any,
    head: Callable[[torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor],
    target: torch.Tensor,
    *,
    n_steps: int = DEFAULT_STEPS,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrated gradients of the contrast of ``head(<cls>)`` for ``target``, per token.

    Parameters
    ----------
    encoder
        A foundation-model encoder (any adaptation applied), in eval mode.
    head
        ``(batch, d_model)`` ``<cls>`` outputs -> ``(batch, n_classes)`` logits.
    batch
        ``gene_ids``, ``values``, ``padding_mask`` from the model's token store (``collate``).
    target
        ``(batch,)`` class code whose contrast (:func:`contrast`) is explained, per cell.
    n_steps
        Points of the midpoint rule along the path.
    classes
        ``(n_classes,)`` boolean mask of the classes in the contrast; ``None``: all.

    Returns
    -------
    torch.Tensor
        ``(batch, length)`` float32 attribution per token; 0 at special tokens and padding. A cell's
        attributions add up to ``contrast(input) - contrast(baseline)`` (in the limit of steps).
    """
    gene_ids, values, padding = batch["gene_ids"], batch["values"], batch["padding_mask"]
    with torch.no_grad():
        inputs = encoder.input_embeddings(gene_ids, values)
        # special tokens (<cls>, <eos>) keep their input on the whole path
        genes = encoder.gene_positions(gene_ids, padding)
        delta = inputs * genes[..., None]
        baseline = inputs - delta
    total = torch.zeros_like(inputs)
    for alpha in (torch.arange(n_steps, dtype=torch.float32) + 0.5) / n_steps:
        point = (baseline + float(alpha) * delta).detach().requires_grad_(True)
        cls = encoder.cell_embedding_from_inputs(point, padding)
        logits = head(cls)
        mask = (
            torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
            if classes is None
            else classes
        )
        score = contrast(logits, target, mask).sum()
        (grad,) = torch.autograd.grad(score, point)
        total += grad
    return ((delta * total).sum(-1) / n_steps).float()


def _token_scores(
    runner: Any,
    kept: Any,
    adata: Any,
    codes: np.ndarray,
    *,
    gene_key: str | None,
    layer: str | None,
    n_steps: int,
    batch_size: int,
    chunk_size: int | None,
    progress: bool,
) -> pd.DataFrame:
    """Mean integrated-gradients attribution per (class, gene) over cells with ``codes >= 0``."""
    # the tokeniser and the progress bar are only needed here
    from scdlkit._shared.progress import tqdm
    from scdlkit._shared.validation import validate_values
    from scdlkit.foundation._data import MIN_GENE_OVERLAP
    from scdlkit.foundation._embed import inference_batches
    from scdlkit.foundation._stream import DEFAULT_CHUNK_SIZE
    from scdlkit.foundation.models import model_card

    ckpt = runner.checkpoint_
    n_classes = len(runner.label_categories_)
    validate_values(adata, layer)  # one streaming pass, before any model work
    device = runner.torch_device
    encoder, head, known = strategy_family(kept.strategy).attribution_parts(
        kept.model, n_classes, device, runner.frozen_encoder
    )
    # (classes x vocabulary) sums: a few MB even for the 60k-token official vocabulary
    totals = np.zeros((n_classes, encoder.vocab_size), dtype=np.float64)
    names: dict[int, str] = {}
    n_cells = adata.n_obs
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE if getattr(adata, "isbacked", False) else max(n_cells, 1)
    selected = np.flatnonzero(codes >= 0)
    bar = tqdm(total=len(selected), desc="attribution", unit="cell", disable=not progress)
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        in_chunk = selected[(selected >= start) & (selected < stop)] - start
        if not len(in_chunk):
            continue
        tokens, match = model_card(ckpt).tokenize(
            adata,
            ckpt,
            gene_key=gene_key,
            layer=layer,
            min_gene_overlap=MIN_GENE_OVERLAP,
            seed=runner.random_state,
            rows=slice(start, stop),
            check_values=False,
        )
        for name, vid in zip(match.names, match.vocab_ids, strict=True):
            if vid >= 0:
                names.setdefault(int(vid), str(name))
        lengths = tokens.lengths[in_chunk]
        for positions in inference_batches(lengths, batch_size):
            cells = in_chunk[positions]
            batch = tokens.collate(cells)
            batch = {k: v.to(device) for k, v in batch.items()}
            target = torch.as_tensor(codes[start + cells], device=device)
            with torch.autocast(device.type, enabled=False):
                attr = integrated_gradients(
                    encoder, head, batch, target, n_steps=n_steps, classes=known
                )
            ids = batch["gene_ids"].cpu().numpy()
            attr = attr.detach().cpu().numpy().astype(np.float64)
            keep = encoder.gene_positions(batch["gene_ids"], batch["padding_mask"]).cpu().numpy()
            rows = np.broadcast_to(codes[start + cells][:, None], ids.shape)
            np.add.at(totals, (rows[keep], ids[keep]), attr[keep])
            bar.update(len(cells))
    bar.close()
    counts = np.bincount(codes[selected], minlength=n_classes).astype(np.float64)
    gene_ids = np.asarray(sorted(names), dtype=np.int64)
    matrix = totals[:, gene_ids] / np.maximum(counts, 1)[:, None]
    return pd.DataFrame(
        matrix, index=list(runner.label_categories_), columns=[names[int(g)] for g in gene_ids]
    )


def _linear_scores(
    runner: Any,
    kept: Any,
    adata: Any,
    codes: np.ndarray,
    *,
    gene_key: str | None,
    layer: str | None,
) -> pd.DataFrame:
    """``coef * (class mean - overall mean)`` of the scaled genes of the expression baseline."""
    from scipy import sparse

    # the baseline's reader brings the Trainer's imports: only for a baseline runner
    from scdlkit._shared.validation import gene_names
    from scdlkit.baselines._expression import log_normalised_matrix

    model = kept.model
    n_classes = len(runner.label_categories_)
    matrix = _model_inputs(model, log_normalised_matrix(adata, layer), gene_names(adata, gene_key))
    selected = codes >= 0
    indicator = sparse.csr_matrix(
        (np.ones(int(selected.sum())), (codes[selected], np.flatnonzero(selected))),
        shape=(n_classes, adata.n_obs),
    )
    counts = np.asarray(indicator.sum(axis=1)).ravel()
    class_means = np.asarray((indicator @ matrix).todense()) / np.maximum(counts, 1)[:, None]
    overall = np.asarray(matrix.mean(axis=0)).ravel()
    coef = np.zeros((n_classes, len(model.genes_)))
    coef[np.asarray(model.classifier_.classes_, dtype=np.int64)] = model.classifier_.coef_
    scores = coef * (class_means - overall[None, :])
    scores[counts == 0] = 0.0
    return pd.DataFrame(scores, index=list(runner.label_categories_), columns=list(model.genes_))


def _model_inputs(model: Any, matrix: Any, genes: pd.Index) -> Any:
    """The baseline's standardised genes, sparse: up to one constant per gene, which cancels in
    the difference of means the scores use."""
    aligned = model._align(matrix, genes)
    if hasattr(model, "_shifted"):  # centred and clipped (CellTypist-style) baseline
        return model._shifted(aligned)
    return model._scaled(aligned)


def attribution_method(strategy: str) -> str:
    """How a strategy is explained: ``"integrated_gradients"`` or ``"linear_attribution"``."""
    return strategy_family(strategy).attribution_method


def class_gene_scores(
    runner: Any,
    adata: Any,
    codes: np.ndarray,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    n_steps: int = DEFAULT_STEPS,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    strategy: str | None = None,
) -> pd.DataFrame:
    """How much each gene drives each class, from the cells of ``adata`` predicted as it.

    Parameters
    ----------
    runner
        A fitted :class:`~scdlkit.AnnotationRunner`.
    adata
        The cells (in memory or backed; read in chunks for the scGPT strategies).
    codes
        Predicted class code per cell; cells with a negative code (``"Unknown"``, or left out)
        are not used.
    gene_key, layer
        Where gene symbols and values are (default: as for the reference).
    n_steps
        Integration points of integrated gradients (scGPT strategies).
    batch_size
        Cells per forward/backward pass (default: the runner's).
    chunk_size
        Cells read and tokenised at a time (scGPT strategies).
    progress
        Show a progress bar.
    strategy
        The kept model to explain (``keep="all"`` runners); default the best.

    Returns
    -------
    pandas.DataFrame
        Classes (the runner's categories, in order) x genes; a class without cells is all zeros.
    """
    codes = np.asarray(codes, dtype=np.int64)
    gene_key = runner.gene_key if gene_key is None else gene_key
    layer = runner.layer if layer is None else layer
    kept = runner.kept_result(strategy)
    family = strategy_family(kept.strategy)
    if family.attribution_method == "linear_attribution":
        return _linear_scores(runner, kept, adata, codes, gene_key=gene_key, layer=layer)
    try:
        return _token_scores(
            runner,
            kept,
            adata,
            codes,
            gene_key=gene_key,
            layer=layer,
            n_steps=n_steps,
            batch_size=batch_size or runner.batch_size,
            chunk_size=chunk_size,
            progress=progress,
        )
    finally:
        if family.moves_to_device:
            kept.model.to("cpu")  # as after predict: the adapted model waits on the CPU


def expression_difference(
    adata: Any, codes: np.ndarray, n_classes: int, *, gene_key: str | None, layer: str | None
) -> pd.DataFrame:
    """Mean log-normalised expression in each class's cells minus that in all other cells.

    Classes (codes ``0..n_classes-1``) x the genes of ``adata`` (symbols from ``gene_key``;
    a repeated symbol keeps its first column). Counts are log-normalised as the baseline does
    (``normalize_total(1e4)`` + ``log1p``); read in chunks of rows (backed AnnData too). A class
    without cells, or whose cells are all the cells, is NaN.
    """
    from scipy import sparse

    # the readers are only needed here
    from scdlkit._shared.validation import (
        describe_values,
        gene_names,
        get_matrix,
        iter_row_chunks,
    )
    from scdlkit.baselines._expression import TARGET_SUM

    codes = np.asarray(codes, dtype=np.int64)
    names = gene_names(adata, gene_key)
    first = ~names.duplicated()
    counts_kind = describe_values(adata, layer) == "raw_counts"
    class_sums = np.zeros((n_classes, int(first.sum())), dtype=np.float64)
    total = np.zeros(int(first.sum()), dtype=np.float64)
    for start, block in iter_row_chunks(get_matrix(adata, layer)):
        block = block[:, np.flatnonzero(first)].astype(np.float64)
        if counts_kind:
            sums = np.asarray(block.sum(axis=1)).ravel()
            scale = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
            block = sparse.diags(scale) @ block
            block = sparse.csr_matrix(block)
            block.data = np.log1p(block.data)
        chunk_codes = codes[start : start + block.shape[0]]
        keep = chunk_codes >= 0
        indicator = sparse.csr_matrix(
            (np.ones(int(keep.sum())), (chunk_codes[keep], np.flatnonzero(keep))),
            shape=(n_classes, block.shape[0]),
        )
        class_sums += np.asarray((indicator @ block).todense())
        total += np.asarray(block.sum(axis=0)).ravel()
    n_in = np.bincount(codes[codes >= 0], minlength=n_classes).astype(np.float64)
    n_out = adata.n_obs - n_in
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = class_sums / n_in[:, None]
        outside = (total[None, :] - class_sums) / n_out[:, None]
    difference = inside - outside
    difference[(n_in == 0) | (n_out == 0)] = np.nan
    return pd.DataFrame(difference, columns=list(names[first]))


def top_genes(
    scores: pd.DataFrame, n_genes: int, difference: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The ``n_genes`` highest-scoring genes per class that point up.

    Columns ``label``, ``rank`` (1 first), ``gene``, ``score`` and, with ``difference``
    (:func:`expression_difference`, rows in the order of ``scores``),
    ``expression_difference``. A gene is kept only with a positive score and, with
    ``difference``, a positive difference (higher in the class's cells; a gene the query lacks
    is left out); classes without such a gene are left out.
    """
    columns = ["label", "rank", "gene", "score"]
    if difference is not None:
        columns.append("expression_difference")
        difference = difference.reindex(columns=scores.columns)
    genes = [str(g) for g in scores.columns]
    rows = []
    for position, label in enumerate(scores.index):
        values = scores.iloc[position].to_numpy(dtype=np.float64)
        keep = values > 0
        if difference is not None:
            up = difference.iloc[position].to_numpy(dtype=np.float64)
            keep &= np.nan_to_num(up, nan=0.0) > 0
        kept = np.flatnonzero(keep)
        best = kept[np.argsort(-values[kept], kind="stable")][:n_genes]
        for rank, column in enumerate(best, start=1):
            entry = {
                "label": str(label),
                "rank": rank,
                "gene": genes[column],
                "score": float(values[column]),
            }
            if difference is not None:
                entry["expression_difference"] = float(up[column])
            rows.append(entry)
    return pd.DataFrame(rows, columns=columns)
