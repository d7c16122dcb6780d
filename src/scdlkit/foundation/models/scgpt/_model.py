"""The scGPT encoder in plain PyTorch, state-dict compatible with the official checkpoints.

Module names mirror upstream (``encoder.embedding``, ``value_encoder.linear1``,
``transformer_encoder.layers.{i}.self_attn.Wqkv``, ...), so an official ``best_model.pt`` loads
key for key. The encoder layer is ours: torch's ``nn.TransformerEncoderLayer`` takes a fused fast
path in ``eval()`` that bypasses wrapped sub-modules, which would silently switch PEFT layers off
at inference (SCGPT_NOTES.md section 6). Every sub-module here is always called.

Under bf16 autocast without gradients (how :func:`scdlkit.tl.embed` and every prediction run), the
encoder runs a bf16 copy of its weights made once, instead of letting autocast cast every weight
on every call (see :func:`bf16_inference_copy`).
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit._shared.hardware import native_bf16
from scdlkit.foundation.models._contract import AdaptationTargets
from scdlkit.foundation.models.scgpt._checkpoint import SPECIAL_TOKENS, ScGPTModelArgs

__all__ = [
    "PackedLinear",
    "ScGPTEncoder",
    "ScGPTEncoderLayer",
    "ScGPTSelfAttention",
    "bf16_inference_copy",
    "set_attention_dropout",
    "set_encoder_dropout",
]

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
        if isinstance(self.linear1, PackedLinear):  # the bf16 inference copy: ReLU fused
            hidden = self.linear1(x, relu=True)
        else:
            hidden = F.relu(self.linear1(x))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(hidden))))


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


#: Where adaptation modules attach in :class:`ScGPTEncoderLayer`: q, k and v are thirds of the
#: packed ``self_attn.Wqkv`` (flash-attn layout).
SCGPT_TARGETS = AdaptationTargets(
    layers="transformer_encoder.layers",
    projections={
        "q": ("self_attn.Wqkv", "q"),
        "k": ("self_attn.Wqkv", "k"),
        "v": ("self_attn.Wqkv", "v"),
        "out_proj": ("self_attn.out_proj", None),
        "linear1": ("linear1", None),
        "linear2": ("linear2", None),
    },
    attention="self_attn",
    attention_norm="norm1",
)


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

    adaptation_targets = SCGPT_TARGETS

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

    def cell_embedding(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The cell embedding upstream's ``embed_data`` extracts: :meth:`cls_embedding`."""
        return self.cls_embedding(gene_ids, values, padding_mask)

    @property
    def vocab_size(self) -> int:
        """Rows of the gene-embedding table (special tokens included)."""
        return self.encoder.embedding.num_embeddings

    def input_embeddings(self, gene_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Each token's input, gene embedding plus value embedding (what attributions vary)."""
        weight = self.encoder.embedding.weight
        return self.encoder(gene_ids) + self.value_encoder(values.to(weight.dtype))

    def cell_embedding_from_inputs(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`cls_embedding` computed from :meth:`input_embeddings` (fp32 path)."""
        attn_mask = (~padding_mask)[:, None, None, :] if padding_mask.any() else None
        return self.transformer_encoder(inputs, attn_mask, first_only=True)[:, 0, :]

    @staticmethod
    def gene_positions(gene_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, length)`` bool, True at gene tokens (not ``<cls>``, not padding)."""
        genes = ~padding_mask
        genes[:, 0] = False
        return genes

    @property
    def head_layers(self) -> int:
        """Depth of the classification head upstream fine-tunes with (``args.n_layers_cls``)."""
        return self.args.n_layers_cls

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
        # sdpa's boolean mask means "may attend"; broadcast over heads and queries.
        attn_mask = (~padding_mask)[:, None, None, :] if padding_mask.any() else None
        fast = bf16_inference_copy(self) if _bf16_inference(self, gene_ids.device) else None
        if fast is not None:
            # the copy is bf16 throughout: autocast would only add casts
            with torch.autocast(gene_ids.device.type, enabled=False):
                x = self.encoder(gene_ids).to(torch.bfloat16)
                x = x + fast.value_encoder(values.to(torch.bfloat16))
                return fast.transformer_encoder(x, attn_mask, first_only=first_only)
        x = self.encoder(gene_ids) + self.value_encoder(
            values.to(self.encoder.embedding.weight.dtype)
        )
        return self.transformer_encoder(x, attn_mask, first_only=first_only)

    def train(self, mode: bool = True) -> ScGPTEncoder:
        """Set training mode; entering it drops the bf16 inference copy (weights will change).

        Parameters
        ----------
        mode
            ``True`` for training, ``False`` for evaluation.

        Returns
        -------
        ScGPTEncoder
            ``self``.
        """
        if mode:
            _INFERENCE_COPIES.pop(self, None)
        return super().train(mode)

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
        >>> from scdlkit.foundation.models.scgpt._tokenize import collate_tokens
        >>> model = sck.foundation.load_scgpt_model("whole-human")  # doctest: +SKIP
        >>> batch = collate_tokens(prepared.tokens, range(8))  # doctest: +SKIP
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     emb = model.cls_embedding(**batch)
        """
        return self.forward(gene_ids, values, padding_mask, first_only=True)[:, 0, :]

    @torch.no_grad()
    def prefix_states(self, prefix_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, keys and values of ``prefix_length`` random genes run through the encoder.

        The genes (never special tokens) and their expression bins are drawn with torch's global
        generator; prefix tuning's ``init="vocab"`` starts from these.

        Parameters
        ----------
        prefix_length
            Number of random genes.

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            Per layer, keys and values ``(prefix_length, d_model)`` (heads contiguous).
        """
        weight = self.encoder.embedding.weight
        excluded = {self.pad_id}
        if self.checkpoint is not None:
            vocab = self.checkpoint.vocab
            excluded |= {vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        candidates = torch.tensor(
            [i for i in range(weight.shape[0]) if i not in excluded] or [self.pad_id]
        )
        pick = torch.randint(len(candidates), (prefix_length,))
        gene_ids = candidates[pick].to(weight.device)[None, :]
        n_bins = self.args.n_bins
        values = torch.randint(1, max(n_bins, 2), (1, prefix_length)).to(
            weight.device, weight.dtype
        )
        was_training = self.training
        self.eval()
        try:
            x = self.encoder(gene_ids) + self.value_encoder(values)
            states = []
            d = self.d_model
            for layer in self.transformer_encoder.layers:
                qkv = layer.self_attn.Wqkv(x)[0]
                states.append((qkv[:, d : 2 * d].clone(), qkv[:, 2 * d :].clone()))
                x = layer(x, None)
        finally:
            self.train(was_training)
        return states


class PackedLinear(nn.Module):
    """Inference-only bf16 copy of an ``nn.Linear``, its weight pre-packed for oneDNN (CPU).

    oneDNN's packed (blocked) weight layout and fused bias run the product at the rate of a bare
    matrix product; ``F.linear`` with a bias costs about a third more in bf16 on CPUs. The
    weight is a plain tensor, not a parameter: the module is never trained or saved.

    Parameters
    ----------
    linear
        The layer to copy (any dtype; the copy is bf16).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def forward(self, x: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
        """``x @ weight.T + bias`` in bf16, for ``x`` of shape ``(..., in_features)``.

        Parameters
        ----------
        x
            bf16 input.
        relu
            Apply ReLU in the same pass.

        Returns
        -------
        torch.Tensor
            ``(..., out_features)`` bf16 output.
        """
        if relu:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@functools.cache
def _packing_works() -> bool:
    """Whether :class:`PackedLinear` runs here, natively in bf16, and agrees with ``F.linear``."""
    if not (native_bf16("cpu") and torch.backends.mkldnn.is_available()):
        return False
    try:
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            probe = nn.Linear(64, 48).to(torch.bfloat16)
            x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
            got = PackedLinear(probe)(x).float()
            want = F.linear(x.float(), probe.weight.float(), probe.bias.float())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


def _autocast_bf16(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type) and (
            torch.get_autocast_dtype(device_type) == torch.bfloat16
        )
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or no autocast there
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled() and (
                torch.get_autocast_cpu_dtype() == torch.bfloat16
            )
        return False


def _bf16_inference(encoder: ScGPTEncoder, device: torch.device) -> bool:
    """Evaluation mode, no gradients, bf16 autocast on ``device`` and fp32 weights."""
    return (
        not encoder.training
        and not torch.is_grad_enabled()
        and encoder.encoder.embedding.weight.dtype == torch.float32
        and _autocast_bf16(device.type)
    )


#: encoder -> (fingerprint of its weights, bf16 copy); dies with the encoder, never saved.
_INFERENCE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(encoder: nn.Module) -> tuple:
    """Identity, storage and version of every parameter: changes when any weight changes."""
    key = []
    for p in encoder.parameters():
        try:
            version = p._version
        except RuntimeError:  # an inference tensor has no version counter
            version = -1
        key.append((id(p), p.data_ptr(), version, p.device))
    return tuple(key)


def bf16_inference_copy(encoder: ScGPTEncoder) -> nn.Module:
    """A bf16 copy of the encoder's value encoder and transformer, made once and reused.

    Autocast casts every fp32 weight to bf16 on every call, and the fp32 residual stream back and
    forth around every layer; both cost as much as a third of bf16 inference on a CPU. The copy
    holds its weights in bf16 (on CPUs with native bf16, linear layers as :class:`PackedLinear`),
    adaptation modules (LoRA, adapters, IA3, prefixes) included. It is rebuilt when any weight
    of ``encoder`` changes (by an optimiser step, ``load_state_dict``, a new adaptation module)
    and dropped when the encoder enters training mode; it is never part of the state dict.
    The gene-embedding table is not copied: its rows are looked up in fp32.

    Parameters
    ----------
    encoder
        The encoder whose copy to return.

    Returns
    -------
    torch.nn.Module
        With ``value_encoder`` and ``transformer_encoder`` sub-modules in bf16 and eval mode.
    """
    key = _fingerprint(encoder)
    cached = _INFERENCE_COPIES.get(encoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    _INFERENCE_COPIES.pop(encoder, None)  # free the old copy before making the new one
    device = encoder.encoder.embedding.weight.device
    with torch.inference_mode(False), torch.no_grad():
        twin = nn.Module()
        twin.value_encoder = copy.deepcopy(encoder.value_encoder)
        twin.transformer_encoder = copy.deepcopy(encoder.transformer_encoder)
        twin.to(torch.bfloat16).eval().requires_grad_(False)
        if device.type == "cpu" and _packing_works():
            for parent in list(twin.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear and child.in_features > 1:
                        setattr(parent, name, PackedLinear(child))
    _INFERENCE_COPIES[encoder] = (key, twin)
    return twin


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


def set_encoder_dropout(module: nn.Module, p: float) -> nn.Module:
    """Set every dropout of an scGPT encoder: embeddings, residual, feed-forward and attention.

    Upstream fine-tunes with the checkpoint's ``dropout`` (0.2) everywhere. Adaptation modules
    keep their own dropout settings (prefix dropout is a prefix-tuning setting).

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

    Raises
    ------
    ValueError
        When ``p`` is outside ``[0, 1)``.

    Examples
    --------
    >>> set_encoder_dropout(model.encoder, 0.0)  # doctest: +SKIP
    """
    if not 0 <= p < 1:
        msg = f"encoder dropout must be in [0, 1), got {p}."
        raise ValueError(msg)
    for sub in module.modules():
        if isinstance(sub, (ContinuousValueEncoder, ScGPTEncoderLayer)):
            # direct children only: adaptation modules nested below keep their own dropout
            for child in sub.children():
                if isinstance(child, nn.Dropout):
                    child.p = float(p)
    return set_attention_dropout(module, p)
