"""Bottleneck adapters (Houlsby et al. 2019); scPEFT's "encoder adapter" is a variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation.models._contract import FoundationEncoder
from scdlkit.foundation.peft._base import (
    PEFTConfig,
    PEFTModule,
    WrappedLinear,
    check_choice,
    check_config,
    check_dropout,
    check_encoder,
    check_layers,
    check_positive_int,
    replace_module,
    selected_layers,
)
from scdlkit.foundation.peft._registry import register_peft_method

__all__ = [
    "AdapterConfig",
    "AdapterLayerNorm",
    "AdapterLinear",
    "BottleneckAdapter",
    "apply_adapter",
]

ADAPTER_ACTIVATIONS = ("relu", "gelu")
ADAPTER_PLACEMENTS = ("attention", "ffn", "both", "post_norm")


@dataclass(frozen=True)
class AdapterConfig(PEFTConfig):
    """Bottleneck adapters (Houlsby et al. 2019) inside each encoder layer.

    An adapter is ``up(dropout(act(down(h))))`` added to the attention block's normalised output
    as scPEFT places it (the default, ``placement="post_norm"``), or to a sub-layer's output
    ``h`` before the residual connection and LayerNorm, ``h + adapter(h)`` (Houlsby's placement).
    ``up`` starts at zero, so the model starts exactly as the pretrained one. scPEFT's "encoder
    adapter" on scGPT (He et al. 2025) has the same shape (512 -> 128 -> 512, GELU, no dropout)
    and sits after the attention block's residual and first LayerNorm (``n + adapter(n)``,
    ``n = norm1(x + attn(x))``, i.e. ``placement="post_norm"``); it differs in that both its
    projections keep PyTorch's default (non-zero) initialisation and only the first half of the
    layers (6 of 12) get one. ``docs/strategies.md`` compares the two.

    Parameters
    ----------
    bottleneck_dim
        Width of the bottleneck. Default ``None``: a quarter of the model width (scPEFT's ratio),
        i.e. 512 -> 128 -> 512 on whole-human and a proportionate width on smaller checkpoints. An
        explicit value must be smaller than the model width (checked when applied).
    dropout
        Dropout after the activation (training only). Default 0.0: scPEFT's adapter has none, and
        the encoder's own dropout stays active around it.
    activation
        ``"gelu"`` (default, scPEFT's adapter) or ``"relu"``.
    placement
        ``"post_norm"`` (default, scPEFT's: on ``n = norm(x + attn(x))``, per token, ``n +
        adapter(n)``, wrapping the post-attention norm; kept by ``benchmarks/tune_defaults.py``,
        where ``"attention"`` was not ahead of it), ``"attention"`` (Houlsby's: on the attention
        block's output before its residual and norm, wrapping the attention output projection),
        ``"ffn"`` (on the feed-forward output, wrapping its output projection) or ``"both"``
        (Houlsby's two adapters per layer, ``"attention"`` and ``"ffn"``).
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation.peft import AdapterConfig
    >>> AdapterConfig(bottleneck_dim=64, placement="both").placement
    'both'
    """

    strategy: ClassVar[str] = "adapter"

    bottleneck_dim: int | None = None
    dropout: float = 0.0
    activation: str = "gelu"
    placement: str = "post_norm"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.bottleneck_dim is not None:
            self._set(
                "bottleneck_dim", check_positive_int(owner, "bottleneck_dim", self.bottleneck_dim)
            )
        self._set("dropout", check_dropout(owner, self.dropout))
        check_choice(owner, "activation", self.activation, ADAPTER_ACTIVATIONS)
        check_choice(owner, "placement", self.placement, ADAPTER_PLACEMENTS)
        self._set("layers", check_layers(owner, self.layers))


class BottleneckAdapter(nn.Module):
    """``up(dropout(act(down(h))))`` with ``up`` initialised to zero.

    Parameters
    ----------
    d_model
        Input and output width.
    bottleneck, activation, dropout
        See :class:`AdapterConfig` (``bottleneck_dim``, ``activation``, ``dropout``).

    Examples
    --------
    >>> BottleneckAdapter(16, 4, "gelu", 0.0)(torch.ones(2, 16)).abs().max().item()
    0.0
    """

    def __init__(self, d_model: int, bottleneck: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(h))))


class AdapterLinear(WrappedLinear):
    """A projection followed by a residual bottleneck adapter: ``h + adapter(h)``, ``h = W x + b``.

    Wrapping the attention output projection puts the adapter on the attention block's output,
    wrapping the feed-forward output projection on the feed-forward output, in both cases before the
    layer's residual and norm. New parameters: ``adapter.down.*`` and ``adapter.up.*``.

    Parameters
    ----------
    base
        The plain ``nn.Linear`` to wrap; its weight and bias are kept (same objects, same names).
    bottleneck, activation, dropout
        See :class:`AdapterConfig`.

    Examples
    --------
    >>> layer = AdapterLinear(nn.Linear(16, 16), 4, "relu", 0.0)
    >>> layer(torch.zeros(2, 16)).shape
    torch.Size([2, 16])
    """

    def __init__(self, base: nn.Linear, bottleneck: int, activation: str, dropout: float) -> None:
        super().__init__(base)
        self.adapter = BottleneckAdapter(self.out_features, bottleneck, activation, dropout).to(
            **self.factory
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_forward(x)
        return h + self.adapter(h)


class AdapterLayerNorm(PEFTModule):
    """A LayerNorm followed by a residual bottleneck adapter: ``n + adapter(n)``, ``n = norm(x)``.

    Wrapping a layer's ``norm1`` puts the adapter on ``norm1(x + attn(x))``, token by token,
    where scPEFT's encoder adapter sits. The LayerNorm's ``weight`` and ``bias`` are kept (same
    objects, same state-dict names); new parameters: ``adapter.down.*`` and ``adapter.up.*``.

    Parameters
    ----------
    base
        The plain ``nn.LayerNorm`` to wrap.
    bottleneck, activation, dropout
        See :class:`AdapterConfig`.

    Examples
    --------
    >>> layer = AdapterLayerNorm(nn.LayerNorm(16), 4, "gelu", 0.0)
    >>> x = torch.randn(2, 3, 16)
    >>> torch.equal(layer(x), nn.functional.layer_norm(x, (16,)))  # up starts at zero
    True
    """

    def __init__(
        self, base: nn.LayerNorm, bottleneck: int, activation: str, dropout: float
    ) -> None:
        super().__init__()
        if type(base) is not nn.LayerNorm:
            msg = (
                f"cannot adapt a {type(base).__name__}: the module was already adapted (one "
                "strategy per model) or is not a plain nn.LayerNorm."
            )
            raise ValueError(msg)
        self.normalized_shape = base.normalized_shape
        self.eps = base.eps
        self.weight = base.weight
        self.bias = base.bias
        (width,) = base.normalized_shape
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter = BottleneckAdapter(width, bottleneck, activation, dropout).to(**factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return n + self.adapter(n)


def apply_adapter(
    encoder: FoundationEncoder, config: AdapterConfig | None = None
) -> FoundationEncoder:
    """Insert bottleneck adapters into ``encoder`` (wrapping ``out_proj``, ``linear2``, ``norm1``).

    Parameters
    ----------
    encoder
        A foundation-model encoder (pretrained weights loaded).
    config
        :class:`AdapterConfig`; ``None`` uses its defaults (128-wide adapter after attention).

    Returns
    -------
    The same encoder, with unchanged outputs until the adapters' up-projections move from zero.

    Raises
    ------
    ValueError
        When ``bottleneck_dim`` is not smaller than the model width.

    Examples
    --------
    >>> from scdlkit.foundation.peft import AdapterConfig, apply_adapter
    >>> apply_adapter(encoder, AdapterConfig(bottleneck_dim=16))  # doctest: +SKIP
    """
    check_encoder(encoder)
    config = check_config("apply_adapter", config, AdapterConfig)
    d_model = encoder.d_model
    width = config.bottleneck_dim or max(d_model // 4, 1)
    if width >= d_model:
        msg = (
            f"AdapterConfig.bottleneck_dim={config.bottleneck_dim} must be smaller than the "
            f"model width d_model={d_model} (a bottleneck); scPEFT uses 128 for d_model=512, "
            f"i.e. a quarter: try bottleneck_dim={max(d_model // 4, 1)}."
        )
        raise ValueError(msg)
    args = (width, config.activation, config.dropout)
    targets = encoder.adaptation_targets
    for layer in selected_layers(encoder, config.layers, "AdapterConfig"):
        if config.placement in ("attention", "both"):
            path = targets.projections["out_proj"][0]
            replace_module(layer, path, lambda base: AdapterLinear(base, *args))
        if config.placement in ("ffn", "both"):
            path = targets.projections["linear2"][0]
            replace_module(layer, path, lambda base: AdapterLinear(base, *args))
        if config.placement == "post_norm":
            replace_module(
                layer, targets.attention_norm, lambda base: AdapterLayerNorm(base, *args)
            )
    return encoder


register_peft_method(name="adapter", config_cls=AdapterConfig, apply=apply_adapter)
