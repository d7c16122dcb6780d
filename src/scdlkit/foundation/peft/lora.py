"""LoRA (Hu et al. 2021): a low-rank update ``B @ A * alpha / rank`` added to chosen projections."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation.models._contract import FoundationEncoder
from scdlkit.foundation.peft._base import (
    PEFTConfig,
    WrappedLinear,
    block_slices,
    check_config,
    check_dropout,
    check_encoder,
    check_layers,
    check_names,
    check_positive_int,
    projection_groups,
    replace_module,
    selected_layers,
)
from scdlkit.foundation.peft._registry import register_peft_method

__all__ = ["LoRAConfig", "LoRALinear", "ScGPTLoRAConfig", "apply_lora", "merge_lora"]

LORA_TARGETS = ("q", "k", "v", "out_proj", "linear1", "linear2")


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
        scPEFT uses ``alpha=1`` (scale 1/8) on scGPT.
    dropout
        Dropout on the input of the low-rank path (training only). Default 0.1, as in the LoRA
        paper's GPT-2 experiments; labelled single-cell sets are small, so some regularisation
        helps.
    target_modules
        Which projections get an update, by role: ``"q"``, ``"k"``, ``"v"`` (the query, key and
        value projections; in a packed projection only those output rows change), ``"out_proj"``
        (attention output), ``"linear1"`` and ``"linear2"`` (feed-forward in and out); the model's
        table (:class:`~scdlkit.foundation.models.AdaptationTargets`) says which module is which.
        Default ``("q", "k", "v")``; the LoRA paper and scPEFT adapt ``("q", "v")``, which learned
        less on small data here (docs/strategies.md).
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all (scPEFT adapts the first 6
        of 12).

    Examples
    --------
    >>> from scdlkit.foundation.peft import LoRAConfig
    >>> LoRAConfig(rank=4, target_modules=("q", "k", "v", "out_proj")).target_modules
    ('q', 'k', 'v', 'out_proj')
    """

    strategy: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q", "k", "v")
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._set("rank", check_positive_int(owner, "rank", self.rank))
        if (
            isinstance(self.alpha, bool | np.bool_)
            or not isinstance(self.alpha, numbers.Real)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            msg = f"{owner}.alpha must be a positive number, got {self.alpha!r}."
            raise ValueError(msg)
        self._set("alpha", float(self.alpha))
        self._set("dropout", check_dropout(owner, self.dropout))
        self._set(
            "target_modules",
            check_names(owner, "target_modules", self.target_modules, LORA_TARGETS),
        )
        self._set("layers", check_layers(owner, self.layers))

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor on the low-rank update."""
        return self.alpha / self.rank


#: Alias kept from the seed API.
ScGPTLoRAConfig = LoRAConfig


class LoRALinear(WrappedLinear):
    """``W x + b`` plus ``scaling * B_t A_t dropout(x)`` on the output rows of each target ``t``.

    For a packed q/k/v projection the targets are ``"q"``, ``"k"``, ``"v"`` and each update touches
    only its third of the output rows; for another projection the single target covers all rows. New
    parameters: ``lora_A.<t>`` (rank x d_in, Kaiming-uniform) and ``lora_B.<t>`` (rows x rank,
    zeros).

    Parameters
    ----------
    base
        The plain ``nn.Linear`` to wrap; its weight and bias are kept (same objects, same names).
    targets
        ``"q"``/``"k"``/``"v"`` blocks of a packed projection, or one name covering all rows.
    rank, alpha, dropout
        See :class:`LoRAConfig`.
    packed
        The row blocks ``base`` packs, in order (see :func:`~._base.block_slices`); ``None``
        treats q/k/v targets as thirds.

    Examples
    --------
    >>> layer = LoRALinear(nn.Linear(8, 24), ["q", "v"], rank=2, alpha=4.0, dropout=0.0)
    >>> layer(torch.zeros(3, 8)).shape
    torch.Size([3, 24])
    """

    def __init__(
        self,
        base: nn.Linear,
        targets: Sequence[str],
        rank: int,
        alpha: float,
        dropout: float,
        *,
        packed: Sequence[str] | None = None,
    ) -> None:
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / rank
        self.slices = block_slices(self.out_features, targets, packed)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            a = torch.empty(rank, self.in_features, **self.factory)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, **self.factory))

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
            self.in_features, self.out_features, bias=self.bias is not None, **self.factory
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


def apply_lora(encoder: FoundationEncoder, config: LoRAConfig | None = None) -> FoundationEncoder:
    """Replace the targeted projections of ``encoder`` by :class:`LoRALinear` wrappers, in place.

    Parameters
    ----------
    encoder
        A foundation-model encoder (pretrained weights loaded).
    config
        :class:`LoRAConfig`; ``None`` uses its defaults (rank 8 on q and v of every layer).

    Returns
    -------
    The same encoder. Its outputs are unchanged until the ``lora_B`` matrices move from zero.
    Nothing is frozen here; see :func:`~scdlkit.foundation.peft.freeze_except_peft`.

    Examples
    --------
    >>> from scdlkit.foundation.peft import LoRAConfig, apply_lora
    >>> apply_lora(encoder, LoRAConfig(rank=4))  # doctest: +SKIP
    """
    check_encoder(encoder)
    config = check_config("apply_lora", config, LoRAConfig)
    groups = projection_groups(encoder.adaptation_targets, config.target_modules)
    for layer in selected_layers(encoder, config.layers, "LoRAConfig"):
        for path, (names, packed) in groups.items():
            replace_module(
                layer,
                path,
                lambda base, names=names, packed=packed: LoRALinear(
                    base, names, config.rank, config.alpha, config.dropout, packed=packed
                ),
            )
    return encoder


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update of ``model`` into its base weight and restore plain ``nn.Linear``.

    Outputs in eval mode are unchanged (up to float rounding); the LoRA parameters are gone, so
    the merged model runs at exactly the pretrained model's cost.

    Parameters
    ----------
    model
        An :class:`~scdlkit.foundation.FoundationEncoder` or any module containing
        :class:`LoRALinear` wrappers (e.g. an annotation model).

    Returns
    -------
    The same model, changed in place.

    Examples
    --------
    >>> from scdlkit.foundation.peft import merge_lora
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


register_peft_method(name="lora", config_cls=LoRAConfig, apply=apply_lora)
