"""Parameter-efficient adaptation of the scGPT encoder: configurations and how they are applied.

Four methods, each a validated configuration plus a function that changes an
:class:`~scdlkit.foundation.ScGPTEncoder` in place (and returns it):

- LoRA (Hu et al. 2021): a low-rank update ``B @ A * alpha / rank`` added to chosen projections.
- Bottleneck adapters (Houlsby et al. 2019; the "encoder adapter" of scPEFT, He et al. 2025).
- Prefix tuning (Li & Liang 2021): learned keys and values joined in front of each layer's own.
- IA3 (Liu et al. 2022): learned vectors rescaling keys, values and feed-forward activations.

Every method is an explicit wrapper module that *replaces* a sub-module of
:class:`~scdlkit.foundation._model.ScGPTEncoderLayer` (``self_attn.Wqkv``, ``self_attn.out_proj``,
``linear1``, ``linear2``) or fills the attention's ``prefix`` slot. Our layer calls every
sub-module in ``train()`` and ``eval()`` alike (no fused fast path, SCGPT_NOTES.md section 6), so
an adaptation is never silently skipped at inference. Wrappers keep the wrapped layer's ``weight``
and ``bias`` under their original state-dict names, so the pretrained keys stay where the
checkpoint has them and only the new parameters are added.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation._checkpoint import SPECIAL_TOKENS
from scdlkit.foundation._model import ScGPTEncoder, ScGPTEncoderLayer

__all__ = [
    "AdapterConfig",
    "IA3Config",
    "LoRAConfig",
    "PEFTConfig",
    "PEFT_CONFIG_TYPES",
    "PrefixTuningConfig",
    "ScGPTLoRAConfig",
    "apply_adapter",
    "apply_ia3",
    "apply_lora",
    "apply_peft",
    "apply_prefix_tuning",
    "freeze_except_peft",
    "merge_lora",
    "peft_parameter_names",
    "resolve_strategy_config",
]

_QKV = ("q", "k", "v")
LORA_TARGETS = ("q", "k", "v", "out_proj", "linear1", "linear2")
IA3_TARGETS = ("k", "v", "ff")
ADAPTER_ACTIVATIONS = ("relu", "gelu")
ADAPTER_PLACEMENTS = ("attention", "ffn", "both")
PREFIX_INITS = ("random", "vocab")


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        msg = f"{owner}.{name} must be a positive integer, got {value!r}."
        raise ValueError(msg)


def _check_dropout(owner: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        msg = f"{owner}.dropout must be a number in [0, 1), got {value!r}."
        raise ValueError(msg)
    return float(value)


def _check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        msg = f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
        raise ValueError(msg)


def _check_names(owner: str, name: str, value: Any, choices: Sequence[str]) -> tuple[str, ...]:
    """A non-empty set of names from ``choices``, returned in the canonical order of ``choices``."""
    if isinstance(value, str):
        value = (value,)
    try:
        items = list(value)
    except TypeError:
        items = None
    if not items or not all(isinstance(v, str) for v in items):
        msg = (
            f"{owner}.{name} must be a non-empty sequence of names among "
            f"{', '.join(map(repr, choices))}; got {value!r}."
        )
        raise ValueError(msg)
    unknown = [v for v in items if v not in choices]
    if unknown:
        msg = (
            f"{owner}.{name} has unknown entries {', '.join(map(repr, unknown))}; valid names "
            f"are {', '.join(map(repr, choices))}."
        )
        raise ValueError(msg)
    if len(set(items)) != len(items):
        msg = f"{owner}.{name} lists a name twice: {value!r}."
        raise ValueError(msg)
    return tuple(c for c in choices if c in items)


def _check_layers(owner: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if _is_int(value):
        value = (value,)
    try:
        items = list(value)
    except TypeError:
        items = None
    if not items or not all(_is_int(v) and v >= 0 for v in items):
        msg = (
            f"{owner}.layers must be None (all layers) or a non-empty sequence of layer indices "
            f">= 0; got {value!r}."
        )
        raise ValueError(msg)
    if len(set(items)) != len(items):
        msg = f"{owner}.layers lists a layer twice: {value!r}."
        raise ValueError(msg)
    return tuple(sorted(items))


# --------------------------------------------------------------------------------------------
# configurations


@dataclass(frozen=True)
class PEFTConfig:
    """Base class of the adaptation configurations; holds the (de)serialisation.

    Subclasses are frozen, validated dataclasses. ``strategy`` names the ``tuning_strategy`` each
    belongs to.

    Examples
    --------
    >>> from scdlkit.foundation._peft import LoRAConfig
    >>> config = LoRAConfig(rank=4)
    >>> LoRAConfig.from_dict(config.to_dict()) == config
    True
    """

    strategy: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy of the fields (tuples become lists).

        Returns
        -------
        ``{field name: value}``; feed it to :meth:`from_dict` to get an equal config back.

        Examples
        --------
        >>> from scdlkit.foundation._peft import IA3Config
        >>> IA3Config().to_dict()
        {'targets': ['k', 'v', 'ff'], 'layers': None}
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PEFTConfig:
        """Build (and validate) a config from a mapping such as :meth:`to_dict` returns.

        Parameters
        ----------
        data
            ``{field name: value}``; absent fields keep their defaults.

        Returns
        -------
        The config.

        Raises
        ------
        ValueError
            For keys that are not fields of this config (named in the message) and for invalid
            values.

        Examples
        --------
        >>> from scdlkit.foundation._peft import LoRAConfig
        >>> LoRAConfig.from_dict({"rank": 4, "target_modules": ["q", "k", "v"]}).rank
        4
        """
        if not isinstance(data, dict):
            msg = f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}."
            raise ValueError(msg)
        names = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            msg = (
                f"unknown {cls.__name__} keys: {', '.join(map(repr, unknown))}; valid keys are "
                f"{', '.join(map(repr, names))}."
            )
            raise ValueError(msg)
        return cls(**data)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class LoRAConfig(PEFTConfig):
    """Low-rank adaptation (LoRA, Hu et al. 2021) of the encoder's linear projections.

    Each targeted projection ``W`` becomes ``W x + (alpha / rank) * B A dropout(x)`` with
    ``A`` (``rank x d_in``, Kaiming-uniform) and ``B`` (``d_out x rank``, zeros), so the model
    starts exactly as the pretrained one. Only ``A`` and ``B`` train. The update can be folded into
    the weights afterwards with :func:`merge_lora`.

    Parameters
    ----------
    rank
        Rank ``r`` of the update. Default 8, the rank scPEFT used on scGPT (He et al. 2025) and
        the LoRA paper's usual setting.
    alpha
        Scale numerator: the update is multiplied by ``alpha / rank``. Default 16 (scale 2, the
        common ``alpha = 2 * rank`` recipe), so changing ``rank`` alone keeps a similar step size.
    dropout
        Dropout on the input of the low-rank path (training only). Default 0.1, as in the LoRA
        paper's GPT-2 experiments; labelled single-cell sets are small, so some regularisation
        helps.
    target_modules
        Which projections get an update: ``"q"``, ``"k"``, ``"v"`` (the query, key and value row
        blocks of the packed ``self_attn.Wqkv``; only those output rows change), ``"out_proj"``
        (attention output), ``"linear1"`` and ``"linear2"`` (feed-forward in and out). Default
        ``("q", "v")``, as in the LoRA paper and scPEFT.
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation._peft import LoRAConfig
    >>> LoRAConfig(rank=4, target_modules=("q", "k", "v", "out_proj")).target_modules
    ('q', 'k', 'v', 'out_proj')
    """

    strategy: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q", "v")
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_positive_int(owner, "rank", self.rank)
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            msg = f"{owner}.alpha must be a positive number, got {self.alpha!r}."
            raise ValueError(msg)
        self._set("alpha", float(self.alpha))
        self._set("dropout", _check_dropout(owner, self.dropout))
        self._set(
            "target_modules",
            _check_names(owner, "target_modules", self.target_modules, LORA_TARGETS),
        )
        self._set("layers", _check_layers(owner, self.layers))

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on the low-rank update."""
        return self.alpha / self.rank


#: Alias kept from the seed API.
ScGPTLoRAConfig = LoRAConfig


@dataclass(frozen=True)
class AdapterConfig(PEFTConfig):
    """Bottleneck adapters (Houlsby et al. 2019) inside each encoder layer.

    An adapter is ``up(dropout(act(down(h))))`` added to a sub-layer's output ``h`` before the
    residual connection and LayerNorm, i.e. ``h + adapter(h)``. ``up`` starts at zero, so the model
    starts exactly as the pretrained one. scPEFT's "encoder adapter" on scGPT is this module with
    512 -> 128 -> 512 after the attention block (He et al. 2025).

    Parameters
    ----------
    bottleneck_dim
        Width of the bottleneck. Default ``None``: a quarter of the model width, i.e. scPEFT's
        512 -> 128 -> 512 on whole-human and a proportionate width on smaller checkpoints. An
        explicit value must be smaller than the model width (checked when applied).
    dropout
        Dropout after the activation (training only). Default 0.0: scPEFT's adapter has none, and
        the encoder's own dropout stays active around it.
    activation
        ``"gelu"`` (default, scPEFT's adapter) or ``"relu"``.
    placement
        ``"attention"`` (default, as scPEFT: on the attention block's output, i.e. wrapping
        ``self_attn.out_proj``), ``"ffn"`` (on the feed-forward output, wrapping ``linear2``) or
        ``"both"`` (Houlsby's two adapters per layer).
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation._peft import AdapterConfig
    >>> AdapterConfig(bottleneck_dim=64, placement="both").placement
    'both'
    """

    strategy: ClassVar[str] = "adapter"

    bottleneck_dim: int | None = None
    dropout: float = 0.0
    activation: str = "gelu"
    placement: str = "attention"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.bottleneck_dim is not None:
            _check_positive_int(owner, "bottleneck_dim", self.bottleneck_dim)
        self._set("dropout", _check_dropout(owner, self.dropout))
        _check_choice(owner, "activation", self.activation, ADAPTER_ACTIVATIONS)
        _check_choice(owner, "placement", self.placement, ADAPTER_PLACEMENTS)
        self._set("layers", _check_layers(owner, self.layers))


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
        Number of prefix slots per layer. Default 8, scPEFT's prefix length on scGPT.
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
    >>> from scdlkit.foundation._peft import PrefixTuningConfig
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
        _check_positive_int(owner, "prefix_length", self.prefix_length)
        self._set("dropout", _check_dropout(owner, self.dropout))
        _check_choice(owner, "init", self.init, PREFIX_INITS)
        self._set("layers", _check_layers(owner, self.layers))


@dataclass(frozen=True)
class IA3Config(PEFTConfig):
    """IA3 (Liu et al. 2022): learned per-channel rescaling of keys, values and FFN activations.

    The vectors start at one, so the model starts exactly as the pretrained one; they are the
    fewest parameters of all strategies (``2 * d_model + d_hid`` per layer with the defaults).

    Parameters
    ----------
    targets
        ``"k"`` and ``"v"`` rescale the key and value row blocks of ``self_attn.Wqkv``'s output;
        ``"ff"`` rescales the feed-forward hidden activations (the input of ``linear2``). Default
        all three, as in the IA3 paper.
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation._peft import IA3Config
    >>> IA3Config(targets=("k", "v")).targets
    ('k', 'v')
    """

    strategy: ClassVar[str] = "ia3"

    targets: tuple[str, ...] = IA3_TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._set("targets", _check_names(owner, "targets", self.targets, IA3_TARGETS))
        self._set("layers", _check_layers(owner, self.layers))


#: ``tuning_strategy`` -> the config class it takes.
PEFT_CONFIG_TYPES: dict[str, type[PEFTConfig]] = {
    "lora": LoRAConfig,
    "adapter": AdapterConfig,
    "prefix_tuning": PrefixTuningConfig,
    "ia3": IA3Config,
}


def resolve_strategy_config(
    strategy: str, config: PEFTConfig | dict[str, Any] | None
) -> PEFTConfig | None:
    """The validated config of ``strategy``: defaults for ``None``, a dict through ``from_dict``.

    Parameters
    ----------
    strategy
        A ``tuning_strategy`` name (``"head"``, ``"full_finetune"``, ``"lora"``, ``"adapter"``,
        ``"prefix_tuning"``, ``"ia3"``). Names are not otherwise checked here.
    config
        ``None``, a config object or a plain dict.

    Returns
    -------
    The config, or ``None`` for strategies that take none (``head``, ``full_finetune``).

    Raises
    ------
    ValueError
        When the config's type does not belong to ``strategy``, or a strategy without a config is
        given one.

    Examples
    --------
    >>> from scdlkit.foundation._peft import resolve_strategy_config
    >>> resolve_strategy_config("lora", {"rank": 4}).rank
    4
    """
    config_type = PEFT_CONFIG_TYPES.get(strategy)
    if config_type is None:
        if config is not None and config != {}:
            msg = (
                f"tuning_strategy={strategy!r} takes no strategy_config (got {config!r}); configs "
                "belong to "
                + ", ".join(f"{k!r} ({v.__name__})" for k, v in PEFT_CONFIG_TYPES.items())
                + "."
            )
            raise ValueError(msg)
        return None
    if config is None:
        return config_type()
    if isinstance(config, dict):
        return config_type.from_dict(config)
    if not isinstance(config, config_type):
        msg = (
            f"tuning_strategy={strategy!r} needs a {config_type.__name__} (or a dict of its "
            f"fields), got {type(config).__name__}."
        )
        raise ValueError(msg)
    return config


# --------------------------------------------------------------------------------------------
# wrapper modules


class _PEFTModule(nn.Module):
    """Mixin marking modules that own adaptation parameters."""

    def peft_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(local name, parameter)`` of the adaptation's own parameters (not the base weights)."""
        for name, param in self.named_parameters():
            if name not in ("weight", "bias"):
                yield name, param


class _WrappedLinear(_PEFTModule):
    """Holds a frozen ``nn.Linear``'s ``weight`` and ``bias`` under their original names."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if type(base) is not nn.Linear:
            msg = (
                f"cannot adapt a {type(base).__name__}: the module was already adapted (one "
                "strategy per model) or is not a plain nn.Linear."
            )
            raise ValueError(msg)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _block_slices(out_features: int, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Row ranges of ``names`` in a projection's output: q/k/v thirds of Wqkv, else all rows."""
    if all(n in _QKV for n in names):
        d = out_features // 3
        return {n: (_QKV.index(n) * d, (_QKV.index(n) + 1) * d) for n in names}
    return {n: (0, out_features) for n in names}


class LoRALinear(_WrappedLinear):
    """``W x + b`` plus ``scaling * B_t A_t dropout(x)`` on the output rows of each target ``t``.

    For the packed ``Wqkv`` the targets are ``"q"``, ``"k"``, ``"v"`` and each update touches only
    its third of the output rows; for another projection the single target covers all rows.
    New parameters: ``lora_A.<t>`` (rank x d_in, Kaiming-uniform) and ``lora_B.<t>`` (rows x rank,
    zeros).

    Parameters
    ----------
    base
        The plain ``nn.Linear`` to wrap; its weight and bias are kept (same objects, same names).
    targets
        ``"q"``/``"k"``/``"v"`` blocks of a packed projection, or one name covering all rows.
    rank, alpha, dropout
        See :class:`LoRAConfig`.

    Examples
    --------
    >>> layer = LoRALinear(nn.Linear(8, 24), ["q", "v"], rank=2, alpha=4.0, dropout=0.0)
    >>> layer(torch.zeros(3, 8)).shape
    torch.Size([3, 24])
    """

    def __init__(
        self, base: nn.Linear, targets: Sequence[str], rank: int, alpha: float, dropout: float
    ) -> None:
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / rank
        self.slices = _block_slices(self.out_features, targets)
        self.lora_dropout = nn.Dropout(dropout)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            a = torch.empty(rank, self.in_features, **factory)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, **factory))

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update ``scaling * B @ A`` of target ``name`` (rows of its block)."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        h = self.lora_dropout(x)
        pieces: list[torch.Tensor] = []
        cursor = 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            update = F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scaling
            if start == 0 and stop == self.out_features:
                return out + update
            if start > cursor:
                pieces.append(out[..., cursor:start])
            pieces.append(out[..., start:stop] + update)
            cursor = stop
        if cursor < self.out_features:
            pieces.append(out[..., cursor:])
        return torch.cat(pieces, dim=-1)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight holds the update (same outputs in eval mode)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            weight = self.weight.detach().clone()
            for name, (start, stop) in self.slices.items():
                weight[start:stop] += self.delta_weight(name)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear


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


class AdapterLinear(_WrappedLinear):
    """A projection followed by a residual bottleneck adapter: ``h + adapter(h)``, ``h = W x + b``.

    Wrapping ``self_attn.out_proj`` puts the adapter on the attention block's output, wrapping
    ``linear2`` on the feed-forward output, in both cases before the layer's residual and norm.
    New parameters: ``adapter.down.*`` and ``adapter.up.*``.

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
            device=self.weight.device, dtype=self.weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_forward(x)
        return h + self.adapter(h)


class IA3Linear(_WrappedLinear):
    """A projection whose input and/or output row blocks are rescaled by learned vectors.

    ``ia3_scale.k`` / ``ia3_scale.v`` multiply the key / value thirds of ``Wqkv``'s output;
    ``ia3_scale.ff`` multiplies the input of ``linear2`` (the feed-forward hidden activations).
    All start at one.

    Parameters
    ----------
    base
        The plain ``nn.Linear`` to wrap; its weight and bias are kept (same objects, same names).
    out_blocks
        ``"q"``/``"k"``/``"v"`` output blocks of a packed ``Wqkv`` to rescale (may be empty).
    scale_input
        Rescale the input features (``ia3_scale.ff``).

    Examples
    --------
    >>> layer = IA3Linear(nn.Linear(8, 24), ["k", "v"], scale_input=False)
    >>> sorted(layer.ia3_scale)
    ['k', 'v']
    """

    def __init__(self, base: nn.Linear, out_blocks: Sequence[str], scale_input: bool) -> None:
        super().__init__(base)
        self.slices = _block_slices(self.out_features, out_blocks) if out_blocks else {}
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.ia3_scale = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            self.ia3_scale[name] = nn.Parameter(torch.ones(stop - start, **factory))
        self.scale_input = scale_input
        if scale_input:
            self.ia3_scale["ff"] = nn.Parameter(torch.ones(self.in_features, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            x = x * self.ia3_scale["ff"]
        out = self.base_forward(x)
        if not self.slices:
            return out
        scale = torch.ones(self.out_features, device=out.device, dtype=out.dtype)
        parts = []
        cursor = 0
        for name, (start, stop) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            if start > cursor:
                parts.append(scale[cursor:start])
            parts.append(self.ia3_scale[name].to(out.dtype))
            cursor = stop
        if cursor < self.out_features:
            parts.append(scale[cursor:])
        return out * torch.cat(parts)


class AttentionPrefix(_PEFTModule):
    """Learned key and value prefixes of one attention layer (the ``self_attn.prefix`` slot).

    ``keys`` and ``values`` are ``(prefix_length, d_model)``, laid out like the rows of
    ``Wqkv``'s key/value blocks (heads contiguous). Called with a batch size, it returns them as
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


# --------------------------------------------------------------------------------------------
# applying


def _selected_layers(
    encoder: ScGPTEncoder, layers: tuple[int, ...] | None, owner: str
) -> list[ScGPTEncoderLayer]:
    stack = list(encoder.transformer_encoder.layers)
    if layers is None:
        return stack
    bad = [i for i in layers if i >= len(stack)]
    if bad:
        msg = (
            f"{owner}.layers={list(layers)} names layers {bad} but the encoder has {len(stack)} "
            f"layers (indices 0..{len(stack) - 1})."
        )
        raise ValueError(msg)
    return [stack[i] for i in layers]


def _check_encoder(encoder: Any) -> None:
    if not isinstance(encoder, ScGPTEncoder):
        msg = f"expected an ScGPTEncoder, got {type(encoder).__name__}."
        raise TypeError(msg)


def apply_lora(encoder: ScGPTEncoder, config: LoRAConfig | None = None) -> ScGPTEncoder:
    """Replace the targeted projections of ``encoder`` by :class:`LoRALinear` wrappers, in place.

    Parameters
    ----------
    encoder
        The scGPT encoder (pretrained weights loaded).
    config
        :class:`LoRAConfig`; ``None`` uses its defaults (rank 8 on q and v of every layer).

    Returns
    -------
    The same encoder. Its outputs are unchanged until the ``lora_B`` matrices move from zero.
    Nothing is frozen here; see :func:`freeze_except_peft`.

    Examples
    --------
    >>> from scdlkit.foundation._peft import LoRAConfig, apply_lora
    >>> apply_lora(encoder, LoRAConfig(rank=4))  # doctest: +SKIP
    """
    _check_encoder(encoder)
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        msg = f"apply_lora needs a LoRAConfig, got {type(config).__name__}."
        raise ValueError(msg)
    qkv = [t for t in config.target_modules if t in _QKV]
    others = [t for t in config.target_modules if t not in _QKV]
    for layer in _selected_layers(encoder, config.layers, "LoRAConfig"):
        attn = layer.self_attn
        if qkv:
            attn.Wqkv = LoRALinear(attn.Wqkv, qkv, config.rank, config.alpha, config.dropout)
        for name in others:
            parent = attn if name == "out_proj" else layer
            wrapped = LoRALinear(
                getattr(parent, name), [name], config.rank, config.alpha, config.dropout
            )
            setattr(parent, name, wrapped)
    return encoder


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update of ``model`` into its base weight and restore plain ``nn.Linear``.

    Outputs in eval mode are unchanged (up to float rounding); the LoRA parameters are gone, so
    the merged model runs at exactly the pretrained model's cost.

    Parameters
    ----------
    model
        An :class:`~scdlkit.foundation.ScGPTEncoder` or any module containing
        :class:`LoRALinear` wrappers (e.g. an annotation model).

    Returns
    -------
    The same model, changed in place.

    Examples
    --------
    >>> from scdlkit.foundation._peft import merge_lora
    >>> merge_lora(model)  # doctest: +SKIP
    """
    targets = [
        (name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    return model


def apply_adapter(encoder: ScGPTEncoder, config: AdapterConfig | None = None) -> ScGPTEncoder:
    """Insert bottleneck adapters into ``encoder`` (wrapping ``out_proj`` and/or ``linear2``).

    Parameters
    ----------
    encoder
        The scGPT encoder (pretrained weights loaded).
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
    >>> from scdlkit.foundation._peft import AdapterConfig, apply_adapter
    >>> apply_adapter(encoder, AdapterConfig(bottleneck_dim=16))  # doctest: +SKIP
    """
    _check_encoder(encoder)
    config = AdapterConfig() if config is None else config
    if not isinstance(config, AdapterConfig):
        msg = f"apply_adapter needs an AdapterConfig, got {type(config).__name__}."
        raise ValueError(msg)
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
    for layer in _selected_layers(encoder, config.layers, "AdapterConfig"):
        if config.placement in ("attention", "both"):
            layer.self_attn.out_proj = AdapterLinear(layer.self_attn.out_proj, *args)
        if config.placement in ("ffn", "both"):
            layer.linear2 = AdapterLinear(layer.linear2, *args)
    return encoder


@torch.no_grad()
def _vocab_prefix_states(
    encoder: ScGPTEncoder, prefix_length: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, keys and values of ``prefix_length`` random genes run through the encoder."""
    weight = encoder.encoder.embedding.weight
    excluded = {encoder.pad_id}
    checkpoint = getattr(encoder, "checkpoint", None)
    if checkpoint is not None:
        excluded |= {checkpoint.vocab[t] for t in SPECIAL_TOKENS if t in checkpoint.vocab}
    candidates = torch.tensor(
        [i for i in range(weight.shape[0]) if i not in excluded] or [encoder.pad_id]
    )
    pick = torch.randint(len(candidates), (prefix_length,))
    gene_ids = candidates[pick].to(weight.device)[None, :]
    n_bins = encoder.args.n_bins
    values = torch.randint(1, max(n_bins, 2), (1, prefix_length)).to(weight.device, weight.dtype)
    was_training = encoder.training
    encoder.eval()
    try:
        x = encoder.encoder(gene_ids) + encoder.value_encoder(values)
        states = []
        d = encoder.d_model
        for layer in encoder.transformer_encoder.layers:
            qkv = layer.self_attn.Wqkv(x)[0]
            states.append((qkv[:, d : 2 * d].clone(), qkv[:, 2 * d :].clone()))
            x = layer(x, None)
    finally:
        encoder.train(was_training)
    return states


def apply_prefix_tuning(
    encoder: ScGPTEncoder, config: PrefixTuningConfig | None = None
) -> ScGPTEncoder:
    """Fill the ``self_attn.prefix`` slot of the chosen layers with learned key/value prefixes.

    Parameters
    ----------
    encoder
        The scGPT encoder (pretrained weights loaded; ``init="vocab"`` reads them).
    config
        :class:`PrefixTuningConfig`; ``None`` uses its defaults (8 prefixes on every layer).

    Returns
    -------
    The same encoder. Unlike LoRA, adapters and IA3, prefixes change the outputs from the start
    (every token can attend to them); removing them (``self_attn.prefix = None``) restores the
    pretrained model exactly.

    Examples
    --------
    >>> from scdlkit.foundation._peft import PrefixTuningConfig, apply_prefix_tuning
    >>> apply_prefix_tuning(encoder, PrefixTuningConfig(prefix_length=4))  # doctest: +SKIP
    """
    _check_encoder(encoder)
    config = PrefixTuningConfig() if config is None else config
    if not isinstance(config, PrefixTuningConfig):
        msg = f"apply_prefix_tuning needs a PrefixTuningConfig, got {type(config).__name__}."
        raise ValueError(msg)
    layers = _selected_layers(encoder, config.layers, "PrefixTuningConfig")
    for layer in layers:
        if layer.self_attn.prefix is not None:
            msg = "the encoder already has attention prefixes (one strategy per model)."
            raise ValueError(msg)
    states = _vocab_prefix_states(encoder, config.prefix_length) if config.init == "vocab" else None
    stack = list(encoder.transformer_encoder.layers)
    weight = encoder.encoder.embedding.weight
    for layer in layers:
        attn = layer.self_attn
        prefix = AttentionPrefix(
            config.prefix_length, encoder.d_model, attn.nhead, config.dropout
        ).to(device=weight.device, dtype=weight.dtype)
        if states is not None:
            keys, values = states[stack.index(layer)]
            with torch.no_grad():
                prefix.keys.copy_(keys)
                prefix.values.copy_(values)
        attn.prefix = prefix
    return encoder


def apply_ia3(encoder: ScGPTEncoder, config: IA3Config | None = None) -> ScGPTEncoder:
    """Add IA3 rescaling vectors (initialised to one) to ``encoder``, in place.

    Parameters
    ----------
    encoder
        The scGPT encoder (pretrained weights loaded).
    config
        :class:`IA3Config`; ``None`` rescales keys, values and FFN activations of every layer.

    Returns
    -------
    The same encoder, with unchanged outputs until the vectors move from one.

    Examples
    --------
    >>> from scdlkit.foundation._peft import IA3Config, apply_ia3
    >>> apply_ia3(encoder, IA3Config(targets=("k", "v")))  # doctest: +SKIP
    """
    _check_encoder(encoder)
    config = IA3Config() if config is None else config
    if not isinstance(config, IA3Config):
        msg = f"apply_ia3 needs an IA3Config, got {type(config).__name__}."
        raise ValueError(msg)
    qkv = [t for t in config.targets if t in _QKV]
    for layer in _selected_layers(encoder, config.layers, "IA3Config"):
        if qkv:
            layer.self_attn.Wqkv = IA3Linear(layer.self_attn.Wqkv, qkv, scale_input=False)
        if "ff" in config.targets:
            layer.linear2 = IA3Linear(layer.linear2, (), scale_input=True)
    return encoder


_APPLY = {
    LoRAConfig: apply_lora,
    AdapterConfig: apply_adapter,
    PrefixTuningConfig: apply_prefix_tuning,
    IA3Config: apply_ia3,
}


def apply_peft(encoder: ScGPTEncoder, config: PEFTConfig) -> ScGPTEncoder:
    """Apply the method ``config`` describes (dispatch on its type) to ``encoder``, in place.

    Parameters
    ----------
    encoder
        The scGPT encoder.
    config
        A :class:`LoRAConfig`, :class:`AdapterConfig`, :class:`PrefixTuningConfig` or
        :class:`IA3Config`.

    Returns
    -------
    The same encoder.

    Examples
    --------
    >>> from scdlkit.foundation._peft import IA3Config, apply_peft
    >>> apply_peft(encoder, IA3Config())  # doctest: +SKIP
    """
    apply = _APPLY.get(type(config))
    if apply is None:
        msg = (
            f"no adaptation method for {type(config).__name__}; expected one of "
            f"{', '.join(c.__name__ for c in _APPLY)}."
        )
        raise ValueError(msg)
    return apply(encoder, config)


def peft_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the adaptation's own parameters in ``model`` (not the pretrained weights).

    Parameters
    ----------
    model
        Any module containing LoRA, adapter, prefix or IA3 modules.

    Returns
    -------
    Parameter names as in ``model.state_dict()``, in module order.

    Examples
    --------
    >>> from scdlkit.foundation._peft import peft_parameter_names
    >>> peft_parameter_names(encoder)[:2]  # doctest: +SKIP
    ['transformer_encoder.layers.0.self_attn.Wqkv.lora_A.q', ...]
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, _PEFTModule):
            prefix = f"{module_name}." if module_name else ""
            names.extend(prefix + local for local, _ in module.peft_named_parameters())
    return names


def freeze_except_peft(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``model`` except the adaptation's own.

    Parameters
    ----------
    model
        An encoder (or any module) with adaptation modules applied.

    Returns
    -------
    The same model.

    Examples
    --------
    >>> from scdlkit.foundation._peft import freeze_except_peft
    >>> freeze_except_peft(apply_lora(encoder))  # doctest: +SKIP
    """
    keep = set(peft_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return model
