"""Prefix tuning (Li & Liang 2021): learned keys and values joined in front of each layer's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from scdlkit.foundation.models._contract import FoundationEncoder
from scdlkit.foundation.peft._base import (
    PEFTConfig,
    PEFTModule,
    check_choice,
    check_config,
    check_dropout,
    check_encoder,
    check_layers,
    check_positive_int,
    selected_layers,
)
from scdlkit.foundation.peft._registry import register_peft_method

__all__ = ["AttentionPrefix", "PrefixTuningConfig", "apply_prefix_tuning"]

PREFIX_INITS = ("random", "vocab")


@dataclass(frozen=True)
class PrefixTuningConfig(PEFTConfig):
    """Prefix tuning (Li & Liang 2021): learned keys and values in front of each layer's own.

    Every adapted layer gets ``prefix_length`` learned key and value vectors per head that every
    token can attend to (the padding mask is extended so prefix slots are never masked). The
    prefixes are not tokens: they are never queries, do not pass through the feed-forward
    network and do not shift the ``<cls>`` position. No reparameterisation MLP is used.

    Parameters
    ----------
    prefix_length
        Number of prefix slots per layer. Default 8, scPEFT's prefix length on scGPT (scPEFT's
        prefixes are deep prompt tokens instead: 8 zero-initialised tokens inserted after
        ``<cls>`` in the first 6 of 12 layers, which pass through attention and the feed-forward
        network like genes).
    dropout
        Dropout on the prefix keys and values (training only). Default 0.0.
    init
        ``"vocab"`` (default): each layer's prefix starts as that layer's keys and values of
        ``prefix_length`` random vocabulary genes (with random expression bins) run through the
        pretrained encoder, which Li & Liang found trains more stably than random vectors, most
        of all with little data. ``"random"``: normal with standard deviation 0.02.
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation.peft import PrefixTuningConfig
    >>> PrefixTuningConfig(prefix_length=4, init="random").prefix_length
    4
    """

    strategy: ClassVar[str] = "prefix_tuning"

    prefix_length: int = 8
    dropout: float = 0.0
    init: str = "vocab"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._set("prefix_length", check_positive_int(owner, "prefix_length", self.prefix_length))
        self._set("dropout", check_dropout(owner, self.dropout))
        check_choice(owner, "init", self.init, PREFIX_INITS)
        self._set("layers", check_layers(owner, self.layers))


class AttentionPrefix(PEFTModule):
    """Learned key and value prefixes of one attention layer (the attention's ``prefix`` slot).

    ``keys`` and ``values`` are ``(prefix_length, d_model)``, laid out like the key/value
    projections' outputs (heads contiguous). Called with a batch size, it returns them as
    ``(batch, heads, prefix_length, head_dim)``.

    Parameters
    ----------
    prefix_length
        Number of prefix slots.
    d_model, nhead
        Model width and number of attention heads.
    dropout
        Dropout on the prefixes (training only).
    std
        Standard deviation of the random initial values.

    Examples
    --------
    >>> keys, values = AttentionPrefix(4, 16, 2, 0.0)(batch=3)
    >>> keys.shape
    torch.Size([3, 2, 4, 8])
    """

    def __init__(
        self, prefix_length: int, d_model: int, nhead: int, dropout: float, *, std: float = 0.02
    ) -> None:
        super().__init__()
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.keys = nn.Parameter(torch.randn(prefix_length, d_model) * std)
        self.values = nn.Parameter(torch.randn(prefix_length, d_model) * std)
        self.dropout = nn.Dropout(dropout)

    @property
    def prefix_length(self) -> int:
        return self.keys.shape[0]

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        x = self.dropout(x).view(self.prefix_length, self.nhead, self.head_dim).transpose(0, 1)
        return x.unsqueeze(0).expand(batch, -1, -1, -1)

    def forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.keys, batch), self._heads(self.values, batch)


def apply_prefix_tuning(
    encoder: FoundationEncoder, config: PrefixTuningConfig | None = None
) -> FoundationEncoder:
    """Fill the attention ``prefix`` slot of the chosen layers with learned key/value prefixes.

    Parameters
    ----------
    encoder
        The scGPT encoder (pretrained weights loaded; ``init="vocab"`` reads them).
    config
        :class:`PrefixTuningConfig`; ``None`` uses its defaults (8 prefixes on every layer).

    Returns
    -------
    The same encoder. Unlike LoRA, adapters and IA3, prefixes change the outputs from the start
    (every token can attend to them); removing them (setting the slot back to ``None``) restores the
    pretrained model exactly.

    Examples
    --------
    >>> from scdlkit.foundation.peft import PrefixTuningConfig, apply_prefix_tuning
    >>> apply_prefix_tuning(encoder, PrefixTuningConfig(prefix_length=4))  # doctest: +SKIP
    """
    check_encoder(encoder)
    config = check_config("apply_prefix_tuning", config, PrefixTuningConfig)
    layers = selected_layers(encoder, config.layers, "PrefixTuningConfig")
    for layer in layers:
        if layer.get_submodule(encoder.adaptation_targets.attention).prefix is not None:
            msg = "the encoder already has attention prefixes (one strategy per model)."
            raise ValueError(msg)
    states = encoder.prefix_states(config.prefix_length) if config.init == "vocab" else None
    stack = list(encoder.get_submodule(encoder.adaptation_targets.layers))
    factory = next(encoder.parameters())
    for layer in layers:
        attn = layer.get_submodule(encoder.adaptation_targets.attention)
        prefix = AttentionPrefix(
            config.prefix_length, encoder.d_model, attn.nhead, config.dropout
        ).to(device=factory.device, dtype=factory.dtype)
        if states is not None:
            keys, values = states[stack.index(layer)]
            with torch.no_grad():
                prefix.keys.copy_(keys)
                prefix.values.copy_(values)
        attn.prefix = prefix
    return encoder


register_peft_method(name="prefix_tuning", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning)
