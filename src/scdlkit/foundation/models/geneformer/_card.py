"""Geneformer's entry in the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scdlkit.foundation.models._contract import ModelCard
from scdlkit.foundation.models.geneformer._checkpoint import (
    CONFIG_FILE,
    resolve_geneformer_checkpoint,
)
from scdlkit.foundation.models.geneformer._genes import (
    GeneformerGeneMatch,
    check_geneformer_overlap,
    match_geneformer_genes,
)
from scdlkit.foundation.models.geneformer._loading import (
    build_geneformer_encoder,
    load_geneformer_weights,
    read_geneformer_weights,
)
from scdlkit.foundation.models.geneformer._model import (
    set_geneformer_attention_dropout,
    set_geneformer_dropout,
)
from scdlkit.foundation.models.geneformer._tokenize import GeneformerTokens, tokenize_geneformer

__all__ = ["GENEFORMER_CARD"]


def _recognises(folder: Path) -> bool:
    """A BERT ``config.json`` beside its weights (scGPT folders hold ``args.json`` instead)."""
    has_weights = (folder / "model.safetensors").is_file() or (
        folder / "pytorch_model.bin"
    ).is_file()
    return (folder / CONFIG_FILE).is_file() and has_weights and not (folder / "args.json").exists()


def _tokenize(
    adata: Any,
    checkpoint: Any,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    min_gene_overlap: int | float = 1,
    seed: int = 0,
    rows: slice | None = None,
    check_values: bool = True,
    progress: bool = False,
    match: GeneformerGeneMatch | None = None,
) -> tuple[GeneformerTokens, GeneformerGeneMatch]:
    """The contract's tokenize: Geneformer's tokens are deterministic (``seed`` is unused) and
    its counts are always checked (the check is part of reading them)."""
    del seed, check_values
    if rows is not None and range(*rows.indices(adata.n_obs)) != range(adata.n_obs):
        adata = adata[rows]  # a view; the whole AnnData is read as it is (no copy)
    return tokenize_geneformer(
        adata,
        checkpoint,
        gene_key=gene_key,
        layer=layer,
        min_gene_overlap=min_gene_overlap,
        progress=progress,
        match=match,
    )


def _match(adata: Any, checkpoint: Any, gene_key: str | None) -> GeneformerGeneMatch:
    return match_geneformer_genes(adata, checkpoint.dictionaries, gene_key)


def _usable_options(options: dict[str, Any]) -> dict[str, Any]:
    """Recorded dictionary paths only while every file is still there; else the folder and its
    neighbours are searched again (the sha256 pins still prove they are the same files)."""
    paths = options.get("dictionaries")
    if isinstance(paths, dict) and not all(Path(str(p)).is_file() for p in paths.values()):
        return {k: v for k, v in options.items() if k != "dictionaries"}
    return dict(options)


def _check_gene_names(names: Any, checkpoint: Any, gene_key: str | None) -> None:
    """Nothing to refuse: upstream sums ids that map to one gene, or reads an exact duplicate
    twice (see the tokeniser), and scdlkit reproduces that."""


GENEFORMER_CARD = ModelCard(
    name="geneformer",
    title="Geneformer",
    recognises=_recognises,
    resolve=resolve_geneformer_checkpoint,
    read_weights=lambda ckpt: read_geneformer_weights(ckpt.weights_path),
    build=build_geneformer_encoder,
    load_weights=load_geneformer_weights,
    match_genes=_match,
    check_gene_names=_check_gene_names,
    usable_options=_usable_options,
    check_gene_overlap=check_geneformer_overlap,
    tokenize=_tokenize,
    set_dropout=set_geneformer_dropout,
    set_attention_dropout=set_geneformer_attention_dropout,
    value_kinds=("raw_counts",),
    truncation_note=(
        "their top-ranked genes fill the input and the rest are left out (as upstream does)"
    ),
    input_note="raw counts (integers), Ensembl gene ids or symbols",
)
