"""The Geneformer encoder (a BERT) in plain PyTorch, state-dict compatible with the checkpoints.

Module names mirror transformers' ``BertModel`` (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query``, ``encoder.layer.{i}.output.LayerNorm``, ...), so an
official ``model.safetensors`` loads key for key once its ``bert.`` prefix is stripped. The layers
are ours: adaptation methods wrap these named sub-modules, and prefix tuning needs the ``prefix``
slot in the self-attention, which transformers' attention classes do not offer.

Hidden states are numbered as transformers' ``output_hidden_states`` numbers them: 0 is the
embedding output, ``i`` the output of layer ``i`` (1-based). Upstream's ``emb_layer=-1`` reads
``hidden_states[n_layers - 1]`` (the second-to-last layer) and ``emb_layer=0`` the last layer
(GENEFORMER_NOTES.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation.models._contract import AdaptationTargets
from scdlkit.foundation.models.geneformer._checkpoint import GeneformerConfig

__all__ = [
    "GENEFORMER_TARGETS",
    "EMB_MODES",
    "GeneformerEncoder",
    "GeneformerLayer",
    "GeneformerSelfAttention",
    "set_geneformer_attention_dropout",
    "set_geneformer_dropout",
]

EMB_MODES = ("cls", "cell")
EMB_LAYERS = (-1, 0)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # transformers' "gelu" is the exact (erf) GELU, torch's default
}


def _check_probability(p: float, what: str) -> float:
    if not 0 <= p < 1:
        msg = f"{what} must be in [0, 1), got {p}."
        raise ValueError(msg)
    return float(p)


class GeneformerEmbeddings(nn.Module):
    """Token + token-type (always 0) + absolute position embeddings, LayerNorm, dropout."""

    def __init__(self, config: GeneformerConfig, pad_id: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``(batch, length)`` token ids into ``(batch, length, hidden)``.

        Parameters
        ----------
        gene_ids
            Token ids, at most ``max_position_embeddings`` per row.

        Returns
        -------
        torch.Tensor
            The embedding output (``hidden_states[0]``).
        """
        return self.from_inputs(self.word_embeddings(gene_ids))

    def from_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The embedding output from word embeddings ``(batch, length, hidden)``.

        Adds the token-type (0) and position embeddings, then LayerNorm and dropout.

        Parameters
        ----------
        inputs
            Word embeddings of the tokens (what attributions vary).

        Returns
        -------
        torch.Tensor
            The embedding output (``hidden_states[0]``).
        """
        length = inputs.shape[1]
        limit = self.position_embeddings.num_embeddings
        if length > limit:
            msg = (
                f"the batch holds {length} tokens per cell, more than the model's "
                f"{limit} positions (max_position_embeddings); tokenise with "
                f"model_input_size <= {limit}."
            )
            raise ValueError(msg)
        # transformers' order of additions: (word + token type) + position
        x = inputs + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:length]
        return self.dropout(self.LayerNorm(x))


class GeneformerSelfAttention(nn.Module):
    """BERT self-attention with separate ``query``/``key``/``value`` projections.

    ``prefix`` is ``None`` or a module returning learned ``(keys, values)`` of shape
    ``(batch, heads, prefix_length, head_dim)`` when called with the batch size; they are joined
    in front of the sequence's own keys and values (prefix tuning), and the mask is extended so
    every prefix slot is attended. The output projection is ``attention.output.dense``, as in BERT.
    """

    def __init__(self, hidden: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.nhead = nhead
        self.head_dim = hidden // nhead
        self.dropout = float(dropout)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.prefix: nn.Module | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.nhead, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """Attention context ``(batch, length, hidden)``, before the output projection.

        Parameters
        ----------
        x
            ``(batch, length, hidden)`` input hidden states.
        attn_mask
            Boolean mask broadcastable to ``(batch, heads, queries, keys)``, True where a key may
            be attended, e.g. ``(batch, 1, 1, length)``; ``None`` attends everywhere. With a
            ``prefix`` module it is extended by True for the prefix slots.
        first_only
            Compute the query at position 0 only (the output is ``(batch, 1, hidden)``).

        Returns
        -------
        torch.Tensor
            The heads' outputs, concatenated. Attention dropout applies in training mode only.
        """
        batch, _length, hidden = x.shape
        q = self._heads(self.query(x[:, :1] if first_only else x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        if self.prefix is not None:
            prefix_k, prefix_v = self.prefix(batch)
            k = torch.cat([prefix_k.to(k.dtype), k], dim=2)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
            if attn_mask is not None:
                keep = attn_mask.new_ones((*attn_mask.shape[:-1], prefix_k.shape[2]))
                attn_mask = torch.cat([keep, attn_mask], dim=-1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(batch, q.shape[2], hidden)


class GeneformerResidualOutput(nn.Module):
    """A block's output projection, dropout, residual and LayerNorm (post-norm).

    BERT's ``attention.output`` and ``output`` are this block, projecting from the hidden size
    and from the intermediate size; their state-dict names are the same (``dense``, ``LayerNorm``).

    Parameters
    ----------
    in_features
        Width of what the block projects (hidden size, or intermediate size).
    config
        The architecture (hidden size, LayerNorm eps, dropout).
    """

    def __init__(self, in_features: int, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(residual + dropout(dense(x)))``.

        Parameters
        ----------
        x
            ``(batch, length, in_features)``: the attention context or the feed-forward
            activations.
        residual
            The block's input ``(batch, length, hidden)``.

        Returns
        -------
        torch.Tensor
            The block's output.
        """
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class GeneformerAttention(nn.Module):
    """BERT's attention block: ``self`` (the attention) and ``output`` (projection, norm)."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.self = GeneformerSelfAttention(
            config.hidden_size, config.num_attention_heads, config.attention_probs_dropout_prob
        )
        self.output = GeneformerResidualOutput(config.hidden_size, config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """Attention, projection, residual and LayerNorm; see :class:`GeneformerSelfAttention`.

        Parameters
        ----------
        x
            ``(batch, length, hidden)`` input hidden states.
        attn_mask
            Boolean "may attend" mask or ``None``.
        first_only
            Compute position 0 alone (its residual is ``x[:, :1]``).

        Returns
        -------
        torch.Tensor
            ``(batch, length, hidden)``, or ``(batch, 1, hidden)`` with ``first_only``.
        """
        context = self.self(x, attn_mask, first_only=first_only)
        return self.output(context, x[:, :1] if first_only else x)


class GeneformerIntermediate(nn.Module):
    """The feed-forward input projection and its activation (ReLU for every Geneformer)."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(dense(x))``.

        Parameters
        ----------
        x
            ``(batch, length, hidden)``.

        Returns
        -------
        torch.Tensor
            ``(batch, length, intermediate)``.
        """
        return self.act(self.dense(x))


class GeneformerLayer(nn.Module):
    """One post-norm BERT layer: attention block, then feed-forward block."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.attention = GeneformerAttention(config)
        self.intermediate = GeneformerIntermediate(config)
        self.output = GeneformerResidualOutput(config.intermediate_size, config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """The layer's output.

        Parameters
        ----------
        x
            ``(batch, length, hidden)`` input hidden states.
        attn_mask
            Boolean "may attend" mask (see :class:`GeneformerSelfAttention`) or ``None``.
        first_only
            Compute position 0 alone.

        Returns
        -------
        torch.Tensor
            ``(batch, length, hidden)``, or ``(batch, 1, hidden)`` with ``first_only``.
        """
        h = self.attention(x, attn_mask, first_only=first_only)
        return self.output(self.intermediate(h), h)


class GeneformerLayerStack(nn.Module):
    """``encoder.layer``: the transformer layers, as BERT names them."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(GeneformerLayer(config) for _ in range(config.num_hidden_layers))


#: Where adaptation modules attach, relative to ``encoder.layer.{i}`` (see ``AdaptationTargets``).
GENEFORMER_TARGETS = AdaptationTargets(
    layers="encoder.layer",
    projections={
        "q": ("attention.self.query", None),
        "k": ("attention.self.key", None),
        "v": ("attention.self.value", None),
        "out_proj": ("attention.output.dense", None),
        "linear1": ("intermediate.dense", None),
        "linear2": ("output.dense", None),
    },
    attention="attention.self",
    attention_norm="attention.output.LayerNorm",
)


class GeneformerEncoder(nn.Module):
    """Geneformer's BERT encoder (embeddings and layers; the masked-LM head is left out).

    Parameters
    ----------
    config
        Architecture from the checkpoint's ``config.json``.
    pad_id
        Token id of ``<pad>`` (the word embedding's ``padding_idx``).
    cls_id, eos_id
        Token ids of ``<cls>`` and ``<eos>`` when the token dictionary has them (V2), else
        ``None``. As upstream, ``cell`` pooling keys off the dictionary: it leaves position 0 out
        when there is a ``<cls>``, and the last real position too when there is an ``<eos>``.

    Attributes
    ----------
    version
        ``"V2"`` with ``<cls>`` and ``<eos>``, else ``"V1"``.
    emb_mode, emb_layer
        What :meth:`cell_embedding` returns (what ``sck.tl.embed`` writes); upstream's
        ``EmbExtractor`` defaults: ``"cls"`` for V2, ``"cell"`` for V1, and layer ``-1`` (the
        second-to-last layer).
    classifier_layer
        The layer :meth:`cls_embedding` reads for classifiers (``0``: the last, as upstream's
        ``BertForSequenceClassification``; pooled as ``emb_mode``), so fine-tuning trains every
        layer.
    checkpoint, load_report
        Set by :func:`~scdlkit.foundation.models.geneformer.load_geneformer_model`.
    """

    adaptation_targets = GENEFORMER_TARGETS

    def __init__(
        self,
        config: GeneformerConfig,
        *,
        pad_id: int = 0,
        cls_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.pad_id = int(pad_id)
        self.cls_id = cls_id
        self.eos_id = eos_id
        self.emb_mode = "cls" if self.version == "V2" else "cell"
        self.emb_layer = -1
        self.classifier_layer = 0
        self.checkpoint = None
        self.load_report = None
        self.embeddings = GeneformerEmbeddings(config, self.pad_id)
        self.encoder = GeneformerLayerStack(config)

    @property
    def version(self) -> str:
        """``"V2"`` when the dictionary has ``<cls>`` and ``<eos>``, else ``"V1"``."""
        return "V2" if self.cls_id is not None and self.eos_id is not None else "V1"

    @property
    def d_model(self) -> int:
        """Width of the hidden states and cell embeddings (``hidden_size``)."""
        return self.config.hidden_size

    @property
    def n_layers(self) -> int:
        """Number of transformer layers."""
        return len(self.encoder.layer)

    @property
    def vocab_size(self) -> int:
        """Rows of the word-embedding table (special tokens included)."""
        return self.embeddings.word_embeddings.num_embeddings

    @property
    def head_layers(self) -> int:
        """Depth of upstream's classification head (2).

        ``BertForSequenceClassification`` reads ``<cls>`` (position 0) of the last layer through
        the pooler's dense layer (tanh), then a linear classifier.
        """
        return 2

    def _attention_mask(
        self, gene_ids: torch.Tensor | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if padding_mask is None:
            padding_mask = gene_ids.eq(self.pad_id)
        if not padding_mask.any():
            return None
        attend = ~padding_mask
        # a row of padding only (a V1 cell without genes) would attend to nothing and give NaN,
        # which a training loss spreads to every weight: let it attend everywhere instead
        empty = ~attend.any(dim=1)
        if empty.any():
            attend = attend | empty[:, None]
        return attend[:, None, None, :]

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        layer: int | None = None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states ``(batch, length, hidden)`` after ``layer`` layers (all by default).

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids, right-padded with ``<pad>``.
        values
            Ignored: Geneformer encodes expression by rank only. Accepted so every model takes
            the batches its token store builds.
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it from
            ``gene_ids == pad_id``. When nothing is padded, attention runs without a mask.
        layer
            Index into the hidden states (0: embedding output, ``i``: output of layer ``i``);
            ``None`` is the last layer. Layers after it are not computed.
        first_only
            Let the last computed layer compute position 0 alone: returns ``(batch, 1, hidden)``.

        Returns
        -------
        torch.Tensor
            ``(batch, length, hidden)``, or ``(batch, 1, hidden)`` with ``first_only``.
        """
        layer = self._layer_index(layer)
        attn_mask = self._attention_mask(gene_ids, padding_mask)
        return self._encode(self.embeddings(gene_ids), attn_mask, layer, first_only=first_only)

    def _layer_index(self, layer: int | None) -> int:
        n = self.n_layers
        layer = n if layer is None else int(layer)
        if not 0 <= layer <= n:
            msg = f"layer={layer} is not a hidden-state index of this model (0..{n})."
            raise ValueError(msg)
        return layer

    def _encode(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, layer: int, *, first_only: bool
    ) -> torch.Tensor:
        """Run the embedding output ``x`` through the first ``layer`` layers."""
        if layer == 0:
            return x[:, :1] if first_only else x
        for i, block in enumerate(self.encoder.layer[:layer]):
            x = block(x, attn_mask, first_only=first_only and i == layer - 1)
        return x

    def hidden_states(
        self, gene_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Every hidden state, as transformers' ``output_hidden_states`` returns them.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids, right-padded with ``<pad>``.
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it.

        Returns
        -------
        list of torch.Tensor
            ``n_layers + 1`` tensors ``(batch, length, hidden)``: the embedding output, then the
            output of each layer.
        """
        attn_mask = self._attention_mask(gene_ids, padding_mask)
        states = [self.embeddings(gene_ids)]
        for block in self.encoder.layer:
            states.append(block(states[-1], attn_mask))
        return states

    def embed(
        self,
        gene_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        mode: str = "cls",
        emb_layer: int = -1,
    ) -> torch.Tensor:
        """Cell embeddings ``(batch, hidden)`` exactly as upstream's ``EmbExtractor`` takes them.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids, right-padded with ``<pad>`` (``<cls>`` first for V2).
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it from
            ``gene_ids``.
        mode
            ``"cls"``: the output at position 0 (``<cls>``; V2 only). ``"cell"``: the mean over
            the cell's gene positions, leaving out position 0 when the dictionary has ``<cls>``
            and the last real position when it has ``<eos>``.
        emb_layer
            Upstream's layer choice: ``-1`` reads ``hidden_states[n_layers - 1]`` (the
            second-to-last layer's output), ``0`` the last layer's output.

        Returns
        -------
        torch.Tensor
            ``(batch, hidden)``. In ``"cell"`` mode a cell without gene tokens has no mean: its
            row is zero (upstream drops such cells at tokenisation).

        Raises
        ------
        ValueError
            For an unknown ``mode`` or ``emb_layer``, ``"cls"`` mode with a V1 dictionary (no
            ``<cls>``), or a row that does not start with ``<cls>``.

        Examples
        --------
        >>> batch = tokens.collate(range(8))  # doctest: +SKIP
        >>> with torch.inference_mode():  # doctest: +SKIP
        ...     emb = model.embed(batch["gene_ids"], batch["padding_mask"], mode="cell")
        """
        self._check_embedding(mode, emb_layer)
        if padding_mask is None:
            padding_mask = gene_ids.eq(self.pad_id)
        if mode == "cls" and (
            gene_ids.shape[1] == 0 or not bool(gene_ids[:, 0].eq(self.cls_id).all())
        ):
            msg = "mode='cls': every cell's tokens must start with <cls>; tokenise for V2."
            raise ValueError(msg)
        return self._pool(self.embeddings(gene_ids), padding_mask, mode, emb_layer)

    def _check_embedding(self, mode: str, emb_layer: int) -> None:
        if mode not in EMB_MODES:
            msg = f"mode={mode!r} is not a Geneformer embedding mode; use 'cls' or 'cell'."
            raise ValueError(msg)
        if emb_layer not in EMB_LAYERS:
            msg = (
                f"emb_layer={emb_layer!r}; upstream offers -1 (second-to-last layer) and 0 "
                "(last layer)."
            )
            raise ValueError(msg)
        if mode == "cls" and self.cls_id is None:
            msg = (
                "mode='cls' needs a <cls> token, which this (V1) token dictionary lacks; "
                "use mode='cell' (upstream's V1 default)."
            )
            raise ValueError(msg)

    def _pool(
        self, embedded: torch.Tensor, padding_mask: torch.Tensor, mode: str, emb_layer: int
    ) -> torch.Tensor:
        """Cell embeddings from the embedding output, as upstream's ``get_embs`` pools."""
        attn_mask = self._attention_mask(None, padding_mask)
        layer = self.n_layers + emb_layer
        if mode == "cls":
            return self._encode(embedded, attn_mask, layer, first_only=True)[:, 0]
        hidden = self._encode(embedded, attn_mask, layer, first_only=False)
        lengths = (~padding_mask).sum(dim=1)
        if self.cls_id is not None:
            hidden = hidden[:, 1:]
            lengths = (lengths - (2 if self.eos_id is not None else 1)).clamp(min=0)
        keep = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
        total = hidden.masked_fill(~keep[:, :, None], 0.0).sum(dim=1)
        # a cell without gene tokens has no mean: its embedding is zero, not 0/0 (upstream drops
        # such cells; here they stay, and the tools label them unknown)
        return total / lengths.clamp(min=1)[:, None].to(total.dtype)

    def cell_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upstream's default cell embedding for this model's version, ``(batch, hidden)``.

        V2: the ``<cls>`` output of the second-to-last layer (``mode="cls", emb_layer=-1``).
        V1: the mean over the cell's genes at the second-to-last layer (``mode="cell"``).
        Set :attr:`emb_mode` and :attr:`emb_layer` to choose another.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids, right-padded with ``<pad>``.
        values
            Ignored (Geneformer has no value input).
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it.

        Returns
        -------
        torch.Tensor
            ``(batch, hidden)`` cell embeddings.
        """
        return self.embed(gene_ids, padding_mask, mode=self.emb_mode, emb_layer=self.emb_layer)

    def cls_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The vector a classifier reads: the last layer, pooled as :attr:`emb_mode`.

        Upstream's classifier (``BertForSequenceClassification``) reads position 0 of the last
        layer; :meth:`cell_embedding` reads the second-to-last (upstream's embedding default),
        which would leave the last layer out of fine-tuning.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids, right-padded with ``<pad>``.
        values
            Ignored (Geneformer has no value input).
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it.

        Returns
        -------
        torch.Tensor
            ``(batch, hidden)``.
        """
        return self.embed(
            gene_ids, padding_mask, mode=self.emb_mode, emb_layer=self.classifier_layer
        )

    def input_embeddings(
        self, gene_ids: torch.Tensor, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each token's word embedding ``(batch, length, hidden)``: what attributions vary.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids.
        values
            Ignored (Geneformer has no value input).

        Returns
        -------
        torch.Tensor
            Word embeddings, before position embeddings and LayerNorm.
        """
        return self.embeddings.word_embeddings(gene_ids)

    def cell_embedding_from_inputs(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`cls_embedding` computed from :meth:`input_embeddings`.

        Parameters
        ----------
        inputs
            ``(batch, length, hidden)`` word embeddings (possibly varied).
        padding_mask
            ``(batch, length)`` bool, True at pad positions.

        Returns
        -------
        torch.Tensor
            ``(batch, hidden)``; equal to :meth:`cls_embedding` on unchanged inputs.
        """
        self._check_embedding(self.emb_mode, self.classifier_layer)
        embedded = self.embeddings.from_inputs(inputs)
        return self._pool(embedded, padding_mask, self.emb_mode, self.classifier_layer)

    def gene_positions(self, gene_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, length)`` bool, True at gene tokens (not ``<cls>``/``<eos>``, not padding).

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` token ids.
        padding_mask
            ``(batch, length)`` bool, True at pad positions.

        Returns
        -------
        torch.Tensor
            Where the cell's genes are.
        """
        genes = ~padding_mask
        for special in (self.cls_id, self.eos_id):
            if special is not None:
                genes = genes & gene_ids.ne(special)
        return genes

    @torch.no_grad()
    def prefix_states(self, prefix_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of ``prefix_length`` random genes run through the encoder.

        The genes (never special tokens) are drawn with torch's global generator; prefix
        tuning's ``init="vocab"`` starts from these.

        Parameters
        ----------
        prefix_length
            Number of random genes.

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            Per layer, keys and values ``(prefix_length, hidden)`` (heads contiguous).
        """
        weight = self.embeddings.word_embeddings.weight
        excluded = {self.pad_id, self.cls_id, self.eos_id}
        if self.checkpoint is not None and self.checkpoint.dictionaries.mask_id is not None:
            excluded.add(self.checkpoint.dictionaries.mask_id)
        candidates = torch.tensor(
            [i for i in range(weight.shape[0]) if i not in excluded] or [self.pad_id]
        )
        pick = torch.randint(len(candidates), (prefix_length,))
        gene_ids = candidates[pick].to(weight.device)[None, :]
        was_training = self.training
        self.eval()
        try:
            x = self.embeddings(gene_ids)
            states = []
            for block in self.encoder.layer:
                attention = block.attention.self
                states.append((attention.key(x)[0].clone(), attention.value(x)[0].clone()))
                x = block(x, None)
        finally:
            self.train(was_training)
        return states

    def set_dropout(self, p: float) -> GeneformerEncoder:
        """Set hidden and attention dropout everywhere in the encoder (e.g. for fine-tuning).

        Adaptation modules attached to the encoder keep their own dropout.

        Parameters
        ----------
        p
            Dropout probability, in ``[0, 1)``.

        Returns
        -------
        GeneformerEncoder
            ``self``.
        """
        set_geneformer_dropout(self, p)
        return self


def set_geneformer_attention_dropout(module: nn.Module, p: float) -> nn.Module:
    """Set the attention-probability dropout of every Geneformer attention in ``module``.

    Parameters
    ----------
    module
        A module holding :class:`GeneformerSelfAttention` blocks; modified in place.
    p
        Dropout probability, in ``[0, 1)``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    p = _check_probability(p, "attention dropout")
    for sub in module.modules():
        if isinstance(sub, GeneformerSelfAttention):
            sub.dropout = p
    return module


def set_geneformer_dropout(module: nn.Module, p: float) -> nn.Module:
    """Set every dropout of a Geneformer encoder: embeddings, residual and attention.

    Upstream trains with ``hidden_dropout_prob`` and ``attention_probs_dropout_prob`` from
    ``config.json`` (0.1 for V2, 0.02 for V1).

    Parameters
    ----------
    module
        The encoder (or a model holding it); modified in place.
    p
        Dropout probability, in ``[0, 1)``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    p = _check_probability(p, "dropout")
    owners = (GeneformerEmbeddings, GeneformerResidualOutput)
    for sub in module.modules():
        if isinstance(sub, owners):
            # direct children only: adaptation modules nested below keep their own dropout
            for child in sub.children():
                if isinstance(child, nn.Dropout):
                    child.p = p
    return set_geneformer_attention_dropout(module, p)
