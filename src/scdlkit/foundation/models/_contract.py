"""What a foundation model provides to the rest of scdlkit.

A model is one folder under ``foundation/models/`` and one :class:`ModelCard` in the registry
(:mod:`scdlkit.foundation.models`). Its encoder is a plain ``nn.Module`` with the attributes of
:class:`FoundationEncoder`; its :class:`AdaptationTargets` table tells the adaptation methods
(:mod:`scdlkit.foundation.peft`) where to attach, by role, so no method names a model's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["AdaptationTargets", "FoundationEncoder", "ModelCard", "ModelCheckpoint", "TokenStore"]

#: Roles a projection can play in a transformer layer. ``q``/``k``/``v``: the attention's query,
#: key and value projections; ``out_proj``: the attention output; ``linear1``/``linear2``: the
#: feed-forward input and output. (The names are scGPT's, kept because saved configs use them.)
PROJECTION_ROLES = ("q", "k", "v", "out_proj", "linear1", "linear2")


@dataclass(frozen=True)
class AdaptationTargets:
    """Where adaptation modules attach in one model's encoder (paths relative to a layer).

    Attributes
    ----------
    layers
        Path of the encoder's ``nn.ModuleList`` of transformer layers.
    projections
        Role (:data:`PROJECTION_ROLES`) -> ``(path of an nn.Linear, block)``. ``block`` is the
        role's row block when one linear packs several roles (scGPT packs ``q``, ``k``
        and ``v`` in thirds); ``None`` when the linear is the role's alone.
    attention
        Path of the self-attention module; it has a ``prefix`` slot (``None`` or a module that,
        called with a batch size, returns key and value prefixes) and an ``nhead`` attribute.
    attention_norm
        Path of the LayerNorm applied to ``x + attention(x)`` (post-norm layers).
    """

    layers: str
    projections: Mapping[str, tuple[str, str | None]]
    attention: str
    attention_norm: str

    def __post_init__(self) -> None:
        missing = [r for r in PROJECTION_ROLES if r not in self.projections]
        if missing:
            msg = f"AdaptationTargets.projections lacks the roles {missing}."
            raise ValueError(msg)

    def packed_blocks(self, path: str) -> tuple[str, ...]:
        """The row blocks, in row order, that the linear at ``path`` packs (empty: unpacked)."""
        return tuple(
            block for block_path, block in self.projections.values() if block_path == path and block
        )


@runtime_checkable
class FoundationEncoder(Protocol):
    """The encoder side of the contract: what runner, strategies and ``tl`` may call.

    ``cls_embedding(gene_ids, values, padding_mask)`` returns the ``(batch, d_model)`` vector a
    classifier reads, from a batch built by the model's token store (``collate``);
    ``cell_embedding`` the one the model's own embedding extraction gives (what ``tl.embed``
    writes; for scGPT the same vector, for Geneformer upstream's default layer).
    ``head_layers`` is the depth of the classification head the model's own recipe trains.
    Attributions vary ``input_embeddings(gene_ids, values)`` (one vector per token) at the
    ``gene_positions`` and read ``cell_embedding_from_inputs(inputs, padding_mask)``, which
    equals ``cls_embedding`` on unchanged inputs; ``vocab_size`` counts the token ids.
    ``prefix_states(prefix_length)`` returns, per layer, the keys and values
    ``(prefix_length, d_model)`` of random vocabulary tokens run through the encoder (the
    starting point of prefix tuning).
    """

    adaptation_targets: AdaptationTargets
    pad_id: int

    @property
    def d_model(self) -> int: ...

    @property
    def head_layers(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def input_embeddings(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor: ...

    def cell_embedding_from_inputs(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor: ...

    def gene_positions(
        self, gene_ids: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor: ...

    def cls_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def cell_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def prefix_states(self, prefix_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


@runtime_checkable
class ModelCheckpoint(Protocol):
    """A resolved checkpoint of some registered model."""

    model_name: str
    name: str
    path: Path

    #: File names that change outputs, small first; ``files_sha256`` hashes exactly these.
    files: tuple[str, ...]

    @property
    def readable_genes(self) -> frozenset[str]: ...

    @property
    def d_model(self) -> int: ...

    @property
    def max_seq_len(self) -> int: ...

    @property
    def n_special_tokens(self) -> int: ...

    @property
    def weights_sha256(self) -> str: ...

    @property
    def files_sha256(self) -> dict[str, str]: ...

    def file_sha256(self, name: str) -> str: ...

    def config_dict(self) -> dict[str, Any]: ...

    def resolve_options(self) -> dict[str, Any]: ...

    @property
    def weights_path(self) -> Path: ...

    @property
    def pad_id(self) -> int: ...


@runtime_checkable
class TokenStore(Protocol):
    """Tokens of a set of cells, built once by a model's ``tokenize``; batches via ``collate``.

    ``collate(cells)`` returns ``gene_ids`` (int64), ``values`` (float32; a model without
    values fills them with ``pad_value``) and ``padding_mask`` (bool, True at pad), each
    ``(len(cells), width)`` padded on the right to the longest cell.
    """

    pad_id: int
    pad_value: float
    #: Most tokens one cell's input may hold (batches are never padded past it).
    max_seq_len: int

    @property
    def n_cells(self) -> int: ...

    @property
    def n_genes_per_cell(self) -> np.ndarray: ...

    @property
    def lengths(self) -> np.ndarray: ...

    @property
    def nbytes(self) -> int: ...

    def collate(self, cells: Sequence[int]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class ModelCard:
    """One registered foundation model: the functions the rest of scdlkit calls for it.

    A checkpoint object (what ``resolve`` returns) has ``name``, ``path``, ``weights_path`` and
    ``model_name`` (this card's ``name``); token stores have ``n_cells``, ``lengths``, ``pad_id``,
    ``pad_value``, ``nbytes`` and ``collate(cells)``; gene matches have ``names``, ``matched``,
    ``unmatched``, ``n_matched`` and ``ratio``.

    Attributes
    ----------
    name
        Registry key, e.g. ``"scgpt"``; what ``model=`` accepts.
    title
        Display name, e.g. ``"scGPT"``.
    recognises
        ``folder -> bool``: whether a checkpoint folder is in this model's layout.
    resolve
        ``(checkpoint, **options) -> checkpoint object``: a folder, a name or an already resolved
        checkpoint; ``options`` are what the checkpoint's ``resolve_options()`` recorded.
    read_weights
        ``checkpoint object -> state dict`` of the pretrained weights (as stored).
    build
        ``checkpoint object -> encoder`` with freshly initialised weights.
    load_weights
        ``(encoder, state) -> report`` loading the pretrained weights, every key accounted for.
    match_genes
        ``(adata, checkpoint object, gene_key) -> gene match``.
    check_gene_names
        ``(names, checkpoint object, gene_key) -> None``: refuse gene names the model would
        misread (scGPT: a name it can read, twice), before any work.
    check_gene_overlap
        ``(match, *, gene_key, min_gene_overlap) -> None``, raising ``ValueError`` when too few
        genes of the data can be read, with what to do about it.
    tokenize
        ``(adata, checkpoint object, *, gene_key, layer, min_gene_overlap, seed, rows,
        check_values, progress, match) -> (tokens, gene match)``; ``match`` is this model's gene
        match of the same AnnData when already made (the preflight's, or an earlier slice's),
        so the genes are not matched again.
    set_dropout
        ``(module, p) -> module``: every dropout of the encoder's layers set to ``p``.
    set_attention_dropout
        ``(module, p) -> module``: the attention-probability dropout set to ``p``.
    usable_options
        ``options -> options``: what a checkpoint's recorded ``resolve_options()`` still says
        (e.g. drops paths that no longer exist, so the folder is searched again; the sha256
        pins still prove it is the same checkpoint).
    upstream_recipe
        Whether ``training="upstream"`` reproduces this model's published fine-tuning recipes
        (scGPT: yes; otherwise the runner refuses that recipe rather than train with another
        model's under its name).
    value_kinds
        The kinds of values the model reads (``"raw_counts"``, ``"log_normalised"``).
    truncation_note
        What happens to a cell expressing more genes than the input holds (for the preflight).
    files
        The file names a checkpoint of this model always has, for messages (a resolved
        checkpoint's own ``files`` are what saved runners pin by sha256).
    official_names
        Names ``resolve`` looks up in the local cache (e.g. scGPT's ``"whole-human"``).
    input_note
        What the model expects as input, for messages and the docs.
    """

    name: str
    title: str
    recognises: Callable[[Path], bool]
    resolve: Callable[[Any], Any]
    read_weights: Callable[[Any], dict[str, torch.Tensor]]
    build: Callable[[Any], Any]
    load_weights: Callable[[Any, dict[str, torch.Tensor]], Any]
    match_genes: Callable[..., Any]
    check_gene_names: Callable[..., None]
    check_gene_overlap: Callable[..., None]
    tokenize: Callable[..., Any]
    set_dropout: Callable[[Any, float], Any]
    set_attention_dropout: Callable[[Any, float], Any]
    usable_options: Callable[[dict[str, Any]], dict[str, Any]] = dict
    upstream_recipe: bool = False
    value_kinds: tuple[str, ...] = ("raw_counts", "log_normalised")
    truncation_note: str = "the model reads only part of their genes"
    files: tuple[str, ...] = ()
    official_names: tuple[str, ...] = ()
    input_note: str = ""
    extras: Mapping[str, Any] = field(default_factory=dict)
