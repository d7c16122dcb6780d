"""The scGPT encoder in plain PyTorch, state-dict compatible with the official checkpoints.

Module names mirror upstream (``encoder.embedding``, ``value_encoder.linear1``,
``transformer_encoder.layers.{i}.self_attn.Wqkv``, ...), so an official ``best_model.pt`` loads
key for key. The encoder layer is ours: torch's ``nn.TransformerEncoderLayer`` takes a fused fast
path in ``eval()`` that bypasses wrapped sub-modules, which would silently switch PEFT layers off
at inference (SCGPT_NOTES.md section 6). Every sub-module here is always called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation._checkpoint import ScGPTModelArgs

__all__ = ["ScGPTEncoder", "ScGPTEncoderLayer", "ScGPTSelfAttention", "set_attention_dropout"]

VALUE_CLAMP = 512.0


class GeneEncoder(nn.Module):
    """Token embedding followed by LayerNorm (upstream ``GeneEncoder``)."""

    def __init__(self, n_tokens: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids and apply LayerNorm.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` integer vocabulary ids.

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)`` gene embeddings.
        """
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """MLP on the (binned) expression value (upstream ``ContinuousValueEncoder``)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Embed each value: clamp at 512, then linear -> ReLU -> linear -> LayerNorm -> dropout.

        Parameters
        ----------
        values
            ``(batch, length)`` floating-point values (expression bins, ``pad_value`` at ``<cls>``
            and padding).

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)`` value embeddings.
        """
        x = values.unsqueeze(-1).clamp(max=VALUE_CLAMP)
        x = self.linear2(F.relu(self.linear1(x)))
        return self.dropout(self.norm(x))


class ScGPTSelfAttention(nn.Module):
    """Multi-head self-attention with a packed ``Wqkv`` projection (flash-attn layout).

    ``prefix`` is an optional module returning learned ``(keys, values)`` of shape
    ``(batch, heads, prefix_length, head_dim)`` that are joined in front of the sequence's own keys
    and values (prefix tuning); the padding mask is extended so every prefix slot is attended.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.prefix: nn.Module | None = None

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """Attention output ``(batch, length, d)``, or ``(batch, 1, d)`` with ``first_only``.

        ``first_only`` computes the output of position 0 (``<cls>``) alone, attending to every
        key as usual: all the last layer must produce for a cell embedding.

        Parameters
        ----------
        x
            ``(batch, length, d_model)`` input hidden states.
        attn_mask
            Boolean mask broadcastable to ``(batch, heads, queries, keys)``, True where a key may
            be attended (the opposite of a padding mask), e.g. ``(batch, 1, 1, length)``; ``None``
            attends everywhere. With a ``prefix`` module, it is extended to the prefix slots.
        first_only
            Compute only the query at position 0.

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)``, or ``(batch, 1, d_model)`` with ``first_only``, after
            ``out_proj``. Attention dropout (``self.dropout``) applies in training mode only.
        """
        batch, length, d_model = x.shape
        qkv = self.Wqkv(x).view(batch, length, 3, self.nhead, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, length, head_dim)
        if first_only:
            q, length = q[:, :, :1], 1
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
        out = out.transpose(1, 2).reshape(batch, length, d_model)
        return self.out_proj(out)


class ScGPTEncoderLayer(nn.Module):
    """Post-norm transformer layer with ReLU, as in every official scGPT checkpoint."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = ScGPTSelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """Self-attention and feed-forward blocks, each followed by residual and LayerNorm.

        Parameters
        ----------
        x
            ``(batch, length, d_model)`` input hidden states.
        attn_mask
            Boolean "may attend" mask, as in :meth:`ScGPTSelfAttention.forward`, or ``None``.
        first_only
            Compute position 0 (``<cls>``) alone; its residual is ``x[:, :1]``.

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)``, or ``(batch, 1, d_model)`` with ``first_only``.
        """
        attended = self.self_attn(x, attn_mask, first_only=first_only)
        x = self.norm1((x[:, :1] if first_only else x) + self.dropout1(attended))
        hidden = self.dropout(F.relu(self.linear1(x)))
        return self.norm2(x + self.dropout2(self.linear2(hidden)))


class TransformerStack(nn.Module):
    def __init__(self, layers: list[ScGPTEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, *, first_only: bool = False
    ) -> torch.Tensor:
        """All positions, or with ``first_only`` position 0 of the last layer alone.

        Parameters
        ----------
        x
            ``(batch, length, d_model)`` embeddings.
        attn_mask
            Boolean "may attend" mask passed to every layer, or ``None``.
        first_only
            Let the last layer compute position 0 only (earlier layers compute all positions).

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)``, or ``(batch, 1, d_model)`` with ``first_only``.
        """
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, attn_mask, first_only=first_only and i == last)
        return x


class ScGPTEncoder(nn.Module):
    """scGPT's gene/value embedding and transformer encoder; the pretraining heads are left out.

    Parameters
    ----------
    args
        Architecture from the checkpoint's ``args.json``.
    n_tokens
        Vocabulary size, special tokens included.
    pad_id
        Id of ``<pad>`` (its embedding row is the ``padding_idx``).
    """

    def __init__(self, args: ScGPTModelArgs, n_tokens: int, pad_id: int) -> None:
        super().__init__()
        self.args = args
        self.pad_id = pad_id
        # set by load_scgpt_model: the resolved checkpoint and what happened to each of its keys
        self.checkpoint = None
        self.load_report = None
        d = args.embsize
        self.encoder = GeneEncoder(n_tokens, d, pad_id)
        self.value_encoder = ContinuousValueEncoder(d, args.dropout)
        self.transformer_encoder = TransformerStack(
            [
                ScGPTEncoderLayer(d, args.nheads, args.d_hid, args.dropout)
                for _ in range(args.nlayers)
            ]
        )

    @property
    def d_model(self) -> int:
        """Width of the hidden states and of the cell embedding (``args.embsize``)."""
        return self.args.embsize

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states ``(batch, length, d_model)``.

        ``padding_mask`` is True at pad positions (torch convention); when omitted it is derived
        from ``gene_ids == pad_id``. ``first_only`` returns ``(batch, 1, d_model)``: the last
        layer computes the ``<cls>`` position only (same values, less work).

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` integer vocabulary ids, ``<cls>`` first, ``<pad>`` after the genes.
        values
            ``(batch, length)`` expression bins (``pad_value`` at ``<cls>`` and padding); cast to
            the dtype of the weights.
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it from ``gene_ids``.
            When no position is padded, attention runs without a mask.
        first_only
            Return position 0 only.

        Returns
        -------
        torch.Tensor
            ``(batch, length, d_model)``, or ``(batch, 1, d_model)`` with ``first_only``.
        """
        if padding_mask is None:
            padding_mask = gene_ids.eq(self.pad_id)
        x = self.encoder(gene_ids) + self.value_encoder(
            values.to(self.encoder.embedding.weight.dtype)
        )
        # sdpa's boolean mask means "may attend"; broadcast over heads and queries.
        attn_mask = (~padding_mask)[:, None, None, :] if padding_mask.any() else None
        return self.transformer_encoder(x, attn_mask, first_only=first_only)

    def cls_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The un-normalised output at the ``<cls>`` position (position 0), ``(batch, d)``.

        Equivalent to ``forward(..., first_only=True)[:, 0, :]``. :func:`scdlkit.tl.embed`
        L2-normalises this per cell.

        Parameters
        ----------
        gene_ids
            ``(batch, length)`` integer vocabulary ids, ``<cls>`` first.
        values
            ``(batch, length)`` expression bins, ``pad_value`` at ``<cls>`` and padding.
        padding_mask
            ``(batch, length)`` bool, True at pad positions; ``None`` derives it from ``gene_ids``.

        Returns
        -------
        torch.Tensor
            ``(batch, d_model)`` cell embeddings.

        Examples
        --------
        >>> from scdlkit.foundation._tokenize import collate_tokens
        >>> model = sck.foundation.load_scgpt_model("whole-human")  # doctest: +SKIP
        >>> batch = collate_tokens(prepared.tokens, range(8))  # doctest: +SKIP
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     emb = model.cls_embedding(**batch)
        """
        return self.forward(gene_ids, values, padding_mask, first_only=True)[:, 0, :]


def set_attention_dropout(module: nn.Module, p: float) -> nn.Module:
    """Set the dropout on attention weights of every scGPT attention block in ``module``.

    Upstream trains with attention dropout equal to ``args.dropout`` (0.2). On CPU, torch has no
    fused attention kernel with dropout, so each attention call becomes several times slower;
    ``p=0`` keeps the fused kernel while the residual and feed-forward dropouts stay in place.

    Parameters
    ----------
    module
        A model holding :class:`ScGPTSelfAttention` blocks (at any depth); modified in place.
    p
        Attention dropout probability, in ``[0, 1)``.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.

    Raises
    ------
    ValueError
        When ``p`` is outside ``[0, 1)``.

    Examples
    --------
    >>> set_attention_dropout(model, 0.0)  # doctest: +SKIP
    """
    if not 0 <= p < 1:
        msg = f"attention dropout must be in [0, 1), got {p}."
        raise ValueError(msg)
    for sub in module.modules():
        if isinstance(sub, ScGPTSelfAttention):
            sub.dropout = float(p)
    return module
