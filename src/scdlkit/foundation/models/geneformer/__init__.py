"""Geneformer: checkpoint layout and loading, dictionaries, rank value tokenisation, the encoder.

Geneformer (Theodoris et al. 2023; V2: Chen et al. 2024) is a BERT over each cell's genes ranked
by median-scaled expression. This folder reads the official releases (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, the four pickled dictionaries, read without
running pickled code) and reproduces the official tokenizer and embeddings; see
``GENEFORMER_NOTES.md`` for the upstream rules followed.
"""

from __future__ import annotations

from scdlkit.foundation.models.geneformer._checkpoint import (
    GeneformerCheckpoint,
    GeneformerConfig,
    resolve_geneformer_checkpoint,
)
from scdlkit.foundation.models.geneformer._dictionaries import (
    GeneformerDictionaries,
    load_geneformer_dictionaries,
    read_dictionary,
)
from scdlkit.foundation.models.geneformer._genes import (
    GeneformerGeneMatch,
    check_geneformer_overlap,
    match_geneformer_genes,
)
from scdlkit.foundation.models.geneformer._loading import (
    GeneformerLoadReport,
    build_geneformer_encoder,
    load_geneformer_model,
    load_geneformer_weights,
    read_geneformer_weights,
)
from scdlkit.foundation.models.geneformer._model import (
    GENEFORMER_TARGETS,
    GeneformerEncoder,
    set_geneformer_attention_dropout,
    set_geneformer_dropout,
)
from scdlkit.foundation.models.geneformer._tokenize import GeneformerTokens, tokenize_geneformer

__all__ = [
    "GENEFORMER_TARGETS",
    "GeneformerCheckpoint",
    "GeneformerConfig",
    "GeneformerDictionaries",
    "GeneformerEncoder",
    "GeneformerGeneMatch",
    "GeneformerLoadReport",
    "GeneformerTokens",
    "build_geneformer_encoder",
    "check_geneformer_overlap",
    "load_geneformer_dictionaries",
    "load_geneformer_model",
    "load_geneformer_weights",
    "match_geneformer_genes",
    "read_dictionary",
    "read_geneformer_weights",
    "resolve_geneformer_checkpoint",
    "set_geneformer_attention_dropout",
    "set_geneformer_dropout",
    "tokenize_geneformer",
]
