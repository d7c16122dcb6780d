from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData

from scdlkit._shared.arguments import check_bool, check_optional_int, check_optional_number
from scdlkit._shared.provenance import check_writable
from scdlkit._shared.slots import (
    annotation_slots,
    check_key_added,
    check_key_name,
    written_by_scdlkit,
)
from scdlkit._shared.validation import validate_values
from scdlkit.tl._checks import (
    check_checkpoint,
    check_device,
    check_has_cells,
    check_optional_str,
    check_random_state,
    check_runner,
)
from scdlkit.tl._labelling import (
    UNKNOWN_LABEL,
    LabellingOptions,
    Vote,
    check_labelling_options,
    check_unknown_label,
    conformal_slots,
    label_cells,
    labelling_slots,
    set_labels,
)
from scdlkit.tl._majority_voting import (
    EXPRESSION_GRAPH,
    MIN_CELLS_TO_VOTE,
    expression_representation,
    majority_vote,
    over_cluster,
    resolve_over_clustering,
)
from scdlkit.tl._runner_source import refuse_celltypist_names, resolve_runner

__all__ = ["annotate"]


def annotate(
    adata: AnnData,
    runner: str | os.PathLike | Any,
    *,
    checkpoint: str | os.PathLike | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    device: str = "auto",
    chunk_size: int | None = None,
    key_added: str = "scgpt_annotation",
    confidence_threshold: float | None = None,
    error_rate: float | None = None,
    temperature_scaling: bool = False,
    unknown_label: str = UNKNOWN_LABEL,
    majority_voting: bool = False,
    over_clustering: str | Sequence[Any] | None = None,
    min_prop: float = 0.0,
    probabilities: bool = True,
    strategy: str | None = None,
    random_state: int = 0,
    copy: bool = False,
    **celltypist_names: Any,
) -> AnnData | None:
    """Label new cells with a fitted annotation runner.

    Every argument is checked before any work, and every slot is built before the first is
    written, so a call that fails leaves ``adata`` exactly as it was.

    Parameters
    ----------
    adata
        Query cells with gene symbols (raw counts or log-normalised). A backed AnnData is read in
        chunks and takes the results in memory, as in :func:`scdlkit.tl.embed`. An AnnData with
        no cells is refused before any work.
    runner
        A fitted :class:`scdlkit.AnnotationRunner`, the folder it was saved to, or the
        reference's record ``ref.uns["scgpt_annotation"]``: then the folder it names is loaded
        and refused if its manifest's sha256 differs from the one recorded (the folder was
        overwritten or edited since), so the labels always come from the model the record
        describes. A runner that was never saved works too: ``uns[key_added]`` then records
        ``runner_dir`` ``"None"`` and ``runner_saved`` ``False``.
    checkpoint
        Base checkpoint when loading from a folder (default: the one recorded at save time).
    gene_key, layer
        Where the query's gene symbols and values are (default: as for the reference).
    device
        Where to run when loading from a folder.
    chunk_size
        Cells read, tokenised and labelled at a time (default: all of an in-memory AnnData,
        50,000 of a backed one). Results do not depend on it in fp32; in bf16 the
        tolerance of the outputs page ("What a cell's result depends on") holds.
    key_added
        Prefix of the written slots: a string without ``/``, backslash or NUL (h5ad and zarr
        refuse them). Refused before any work when the slots would replace the
        ``over_clustering`` column, or obs/obsm entries that scdlkit did not write.
    confidence_threshold
        Cells whose top probability is below it are labelled ``unknown_label`` (CellTypist's
        ``p_thres``); default: the runner's own ``confidence_threshold`` (often ``None``: every
        cell gets its most probable label). ``0`` labels every cell.
    error_rate
        Label with a stated error rate instead (conformal prediction, e.g. ``0.1``): each cell
        gets the set of classes that holds its true class with probability at least
        ``1 - error_rate``, calibrated on the runner's calibration cells (class by class;
        classes with fewer than ``1/error_rate - 1`` calibration cells use the threshold of
        all of them); a cell whose set holds one class gets it, any other gets
        ``unknown_label``. Writes ``obsm[f"{key_added}_prediction_set"]`` (cells x classes,
        boolean), ``obs[f"{key_added}_set_size"]`` and ``uns[key_added]["conformal"]``
        (method, target error, calibration cells, per-class thresholds). What is guaranteed and
        what is not: docs/label_transfer.md, "Labels with a stated error rate". Not with
        ``confidence_threshold``.
    temperature_scaling
        Rescale the probabilities (``obsm[f"{key_added}_probabilities"]``, the confidence and
        what ``confidence_threshold`` cuts) by the temperature fitted on the runner's
        calibration cells, so that a probability of 0.8 is right about 80% of the time on
        cells like them; no label changes without a threshold. The prediction sets of
        ``error_rate`` always use the unscaled probabilities. Recorded in
        ``uns[key_added]["params"]["temperature"]``.
    unknown_label
        Label of the cells under the threshold (or without a single-class set).
    majority_voting
        Also write ``obs[f"{key_added}_majority_voting"]``: every cell takes the most frequent
        label of its cluster of ``over_clustering`` (as in CellTypist), which smooths single-cell
        noise on large queries. Without ``over_clustering``, a query of 50 cells or fewer is
        not voted on (CellTypist's rule): a ``UserWarning`` says so, no vote slot is written and
        ``uns[key_added]["majority_voting"]`` records ``performed`` ``False`` and the reason.
    over_clustering
        Clusters for the vote: an ``obs`` column (kept as it is, also when it is the
        ``obs[f"{key_added}_over_clustering"]`` of an earlier vote), or one value per cell;
        used whatever the number of cells. ``None`` over-clusters the cells on their
        **expression**, independently of the model (CellTypist's graph: log-normalised values,
        genes in at least 5 cells, the 2,500 most variable, scaled, 50 principal components, 10
        neighbours; an existing ``obsp["connectivities"]`` is not used, as it may have been
        built on the annotation's own representation), then scanpy's Leiden at CellTypist's
        resolution for the number of cells (5 up to 5,000 cells ... 30 above 200,000). Leiden
        needs ``igraph`` (``pip install 'scdlkit[leiden]'``); without it the components are
        split by k-means (``7 x`` the resolution clusters, at most one per 10 cells) with a
        ``UserWarning``. The clusters go to ``obs[f"{key_added}_over_clustering"]``, the method
        (``"leiden"`` or ``"kmeans"``) to ``uns[key_added]["majority_voting"]["method"]``.
    min_prop
        A cluster whose majority label holds a smaller share of its cells is called
        ``"Heterogeneous"``. Only with ``majority_voting=True``: a ``min_prop`` above 0
        without it is an error.
    probabilities
        Write ``obsm[f"{key_added}_probabilities"]``: a DataFrame of every class's probability
        (columns: the runner's categories; rows sum to 1).
    strategy
        Label with this strategy instead of the best one: any strategy of a runner fitted with
        ``keep="all"`` (``sck.tl.adapt_annotation(..., keep="all")``); recorded in
        ``uns[key_added]["strategy"]``.
    random_state
        Seeds the over-clustering.
    copy
        Return a modified copy instead of writing into ``adata`` (not for a backed AnnData).
    **celltypist_names
        None are accepted: CellTypist's argument names (``model``, ``p_thres``, ``mode``,
        ``use_GPU``, ``transpose_input``) raise a ``TypeError`` that names scdlkit's own.

    Returns
    -------
    AnnData or None
        ``None``, or the annotated copy when ``copy=True``. Writes ``obs[key_added]``,
        ``obs[f"{key_added}_confidence"]``, ``obs[f"{key_added}_split"]`` (``"query"``),
        ``obsm[f"X_{key_added}"]``, ``obsm[f"{key_added}_probabilities"]``, with majority voting
        ``obs[f"{key_added}_majority_voting"]`` (and ``obs[f"{key_added}_over_clustering"]`` when
        computed here), and ``uns[key_added]`` (``best_strategy``, ``label_categories``,
        ``strategy`` (the one that labelled), ``runner_dir``, ``params``, ``versions``; with
        voting ``majority_voting``: ``performed``, ``method``, and ``clusters``, one row per
        cluster: ``cluster``, ``label``, ``share``, ``n_cells``).

    Examples
    --------
    >>> sck.tl.annotate(query, ref.uns["scgpt_annotation"]["runner_dir"])  # doctest: +SKIP
    >>> query.obs["scgpt_annotation"].value_counts()  # doctest: +SKIP
    >>> sck.tl.annotate(
    ...     query, runner_dir, confidence_threshold=0.5, majority_voting=True
    ... )  # doctest: +SKIP
    """
    refuse_celltypist_names(celltypist_names)
    copy = check_bool("copy", copy)
    check_writable(adata, copy=copy)
    check_has_cells(adata, "annotate")
    runner = check_runner(runner, records=True)
    checkpoint = check_checkpoint("checkpoint", checkpoint, optional=True)
    gene_key = check_optional_str("gene_key", gene_key)
    layer = check_optional_str("layer", layer)
    device = check_device(device)
    chunk_size = check_optional_int("chunk_size", chunk_size, min_value=1)
    options = check_labelling_options(
        confidence_threshold,
        unknown_label,
        min_prop,
        majority_voting=majority_voting,
        probabilities=probabilities,
    )
    random_state = check_random_state(random_state)
    strategy = check_optional_str("strategy", strategy)
    temperature_scaling = check_bool("temperature_scaling", temperature_scaling)
    error_rate = check_optional_number(
        "error_rate", error_rate, min_value=0.0, max_value=1.0, min_inclusive=False,
        max_inclusive=False,
    )  # fmt: skip
    if error_rate is not None and options.confidence_threshold is not None:
        msg = (
            "pass error_rate= (conformal prediction sets) or confidence_threshold= (a cut on the "
            "top probability), not both."
        )
        raise ValueError(msg)
    if over_clustering is not None and not options.majority_voting:
        msg = "over_clustering= is used only with majority_voting=True; pass both, or neither."
        raise ValueError(msg)
    if options.min_prop > 0 and not options.majority_voting:
        msg = (
            f"min_prop={options.min_prop:g} is used only with majority_voting=True (it names "
            "'Heterogeneous' the clusters of the vote); pass majority_voting=True, or drop "
            "min_prop."
        )
        raise ValueError(msg)
    key_added = _check_key_added(
        adata, key_added, options, over_clustering, conformal=error_rate is not None
    )
    clusters = resolve_over_clustering(adata, over_clustering) if options.majority_voting else None

    runner = resolve_runner(runner, checkpoint, device)
    threshold = (
        runner.confidence_threshold
        if options.confidence_threshold is None
        else options.confidence_threshold
    )
    if error_rate is not None:
        threshold = None  # the sets decide; the runner's own threshold does not apply
    wants_calibration = error_rate is not None or temperature_scaling
    calibration = runner.conformal_calibration(strategy) if wants_calibration else None
    check_unknown_label(
        runner.label_categories_,
        error_rate if error_rate is not None else threshold,
        options.unknown_label,
    )
    _warn_if_normalised_differently(runner, adata, layer)
    predictions = runner.predict(
        adata, gene_key=gene_key, layer=layer, chunk_size=chunk_size, strategy=strategy
    )
    sets = record = None
    unscaled = predictions["probabilities"]
    temperature = None
    if temperature_scaling:
        temperature = float(calibration.temperature)
        predictions["probabilities"] = _scaled(unscaled, temperature)
    if error_rate is not None:
        sets = calibration.prediction_sets(unscaled, error_rate)
        silent = predictions.get("no_expression")
        if silent is not None:  # uniform probabilities say nothing: no set
            sets[np.asarray(silent, dtype=bool)] = False
        record = calibration.record(error_rate, runner.label_categories_)
        labels, categories = set_labels(
            sets,
            runner.label_categories_,
            options.unknown_label,
            no_expression=predictions.get("no_expression"),
        )
    else:
        labels, categories = label_cells(
            predictions["probabilities"],
            runner.label_categories_,
            threshold,
            options.unknown_label,
            no_expression=predictions.get("no_expression"),
        )
    skip_vote = _skip_vote(adata, options, over_clustering)
    vote = (
        _vote(
            labels, clusters, over_clustering, adata, layer or runner.layer, options, random_state
        )
        if options.majority_voting and skip_vote is None
        else None
    )
    labelling = {
        "confidence_threshold": threshold,
        "error_rate": error_rate,
        "temperature": temperature,
        "unknown_label": options.unknown_label,
        "majority_voting": options.majority_voting,
        "over_clustering": over_clustering if isinstance(over_clustering, str) else None,
        "min_prop": options.min_prop,
        "probabilities": options.probabilities,
    }
    slots = annotation_slots(
        adata,
        runner,
        predictions,
        key_added=key_added,
        split=np.full(adata.n_obs, "query", dtype=object),
        uns={
            "strategy": strategy or runner.best_strategy_,
            "params": {
                **runner.params(),
                "query_gene_key": gene_key,
                "query_layer": layer,
                **labelling,
            },
        },
    )
    labelling_slots(
        slots,
        adata,
        key_added,
        labels,
        categories,
        predictions["probabilities"] if options.probabilities else None,
        vote,
        keep=[over_clustering] if isinstance(over_clustering, str) else [],
        replace_stale=written_by_scdlkit(adata, key_added),
    )
    conformal_slots(
        slots,
        adata,
        key_added,
        sets,
        runner.label_categories_,
        record,
        replace_stale=written_by_scdlkit(adata, key_added),
    )
    if skip_vote is not None:
        slots.uns[key_added]["majority_voting"] = {"performed": False, "reason": skip_vote}
    if copy:
        adata = adata.copy()
    slots.write(adata)
    return adata if copy else None


def _scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities (the runner's calibration, applied when labelling)."""
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import scale_probabilities

    return scale_probabilities(probabilities, temperature)


def _skip_vote(adata: AnnData, options: LabellingOptions, over_clustering: Any) -> str | None:
    """Why the vote is skipped (too few cells to over-cluster, CellTypist's rule), or ``None``."""
    if not options.majority_voting or over_clustering is not None:
        return None
    if adata.n_obs > MIN_CELLS_TO_VOTE:
        return None
    reason = (
        f"{adata.n_obs} cells are too few to over-cluster (CellTypist's rule: more than "
        f"{MIN_CELLS_TO_VOTE}), so no majority voting was done; pass over_clustering= (your own "
        "clusters) to vote on them anyway"
    )
    warnings.warn(f"{reason}.", UserWarning, stacklevel=3)
    return reason


def _vote(
    labels: np.ndarray,
    clusters: np.ndarray | None,
    over_clustering: Any,
    adata: AnnData,
    layer: str | None,
    options: LabellingOptions,
    random_state: int,
) -> Vote:
    """The majority vote over the given clusters, or over clusters of the cells' expression."""
    named = over_clustering if isinstance(over_clustering, str) else "one value per cell"
    how: dict[str, Any] = {"method": "given", "over_clustering": named}
    computed = clusters is None
    if computed:
        rep = expression_representation(adata, layer, random_state=random_state)
        clusters, how = over_cluster(rep, random_state=random_state)
        how["representation"] = EXPRESSION_GRAPH
    summary = majority_vote(labels, clusters, min_prop=options.min_prop)
    return Vote(computed, clusters, *summary, {"performed": True, **how})


def _check_key_added(
    adata: AnnData,
    key_added: Any,
    options: LabellingOptions,
    over_clustering: Any,
    *,
    conformal: bool = False,
) -> str:
    """``key_added`` checked against every slot this call writes and the clusters it reads."""
    key_added = check_key_name("key_added", key_added)
    obs_columns, obsm_keys = [], []
    if options.majority_voting:
        obs_columns.append(f"{key_added}_majority_voting")
        if over_clustering is None:
            obs_columns.append(f"{key_added}_over_clustering")
    if options.probabilities:
        obsm_keys.append(f"{key_added}_probabilities")
    if conformal:
        obs_columns.append(f"{key_added}_set_size")
        obsm_keys.append(f"{key_added}_prediction_set")
    inputs = [over_clustering] if isinstance(over_clustering, str) else []
    return check_key_added(
        adata, key_added, inputs=inputs, obs_columns=obs_columns, obsm_keys=obsm_keys
    )


def _warn_if_normalised_differently(runner: Any, adata: AnnData, layer: str | None) -> None:
    """One warning naming both normalisations when the query's would change the labels."""
    # scdlkit.foundation brings torch: imported when the tool runs, so `import scdlkit` stays light
    from scdlkit.foundation import describe_normalisation, normalisation_mismatch

    layer = runner.layer if layer is None else layer
    validate_values(adata, layer)  # scaled or non-finite values: refused, not warned about
    query = describe_normalisation(adata, layer)
    message = normalisation_mismatch(getattr(runner, "normalisation_", None), query)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
