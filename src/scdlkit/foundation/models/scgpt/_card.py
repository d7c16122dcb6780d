"""scGPT's entry in the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scdlkit._shared.provenance import check_unique_genes
from scdlkit.foundation.models._contract import ModelCard
from scdlkit.foundation.models.scgpt._checkpoint import (
    CHECKPOINT_FILES,
    OFFICIAL_CHECKPOINTS,
    resolve_checkpoint,
)
from scdlkit.foundation.models.scgpt._genes import check_gene_overlap, match_genes, tokenize_adata
from scdlkit.foundation.models.scgpt._loading import (
    build_encoder,
    load_encoder_weights,
    load_state_dict_file,
)
from scdlkit.foundation.models.scgpt._model import set_attention_dropout, set_encoder_dropout

__all__ = ["SCGPT_CARD"]


def _check_gene_names(names: Any, checkpoint: Any, gene_key: str | None) -> None:
    check_unique_genes(names, vocab=checkpoint.vocab, gene_key=gene_key)


def _recognises(folder: Path) -> bool:
    return (folder / "args.json").is_file() and (folder / "vocab.json").is_file()


SCGPT_CARD = ModelCard(
    name="scgpt",
    title="scGPT",
    recognises=_recognises,
    resolve=resolve_checkpoint,
    read_weights=lambda ckpt: load_state_dict_file(ckpt.weights_path),
    build=build_encoder,
    load_weights=load_encoder_weights,
    match_genes=match_genes,
    check_gene_names=_check_gene_names,
    check_gene_overlap=check_gene_overlap,
    tokenize=tokenize_adata,
    set_dropout=set_encoder_dropout,
    set_attention_dropout=set_attention_dropout,
    upstream_recipe=True,
    truncation_note="a seeded random subset of their genes is used (as upstream does)",
    files=CHECKPOINT_FILES,
    official_names=tuple(OFFICIAL_CHECKPOINTS),
    input_note=(
        "raw counts or log-normalised values (non-negative), gene symbols; a folder with "
        + ", ".join(CHECKPOINT_FILES)
    ),
)
