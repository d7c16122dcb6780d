"""IA3 (Liu et al. 2022): learned vectors rescaling keys, values and feed-forward activations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from scdlkit.foundation.models._contract import FoundationEncoder
from scdlkit.foundation.peft._base import (
    QKV,
    PEFTConfig,
    WrappedLinear,
    block_slices,
    check_config,
    check_encoder,
    check_layers,
    check_names,
    projection_groups,
    replace_module,
    selected_layers,
)
from scdlkit.foundation.peft._registry import register_peft_method

__all__ = ["IA3Config", "IA3Linear", "apply_ia3"]

IA3_TARGETS = ("k", "v", "ff")


@dataclass(frozen=True)
class IA3Config(PEFTConfig):
    """IA3 (Liu et al. 2022): learned per-channel rescaling of keys, values and FFN activations.

    The vectors start at one, so the model starts exactly as the pretrained one; they are the
    fewest parameters of all strategies (``2 * d_model + d_hid`` per layer with the defaults).

    Parameters
    ----------
    targets
        ``"k"`` and ``"v"`` rescale the key and value projections' outputs; ``"ff"`` rescales the
        feed-forward hidden activations (the input of the feed-forward output projection). Default
        all three, as in the IA3 paper.
    layers
        Encoder layer indices to adapt; ``None`` (default) adapts all.

    Examples
    --------
    >>> from scdlkit.foundation.peft import IA3Config
    >>> IA3Config(targets=("k", "v")).targets
    ('k', 'v')
    """

    strategy: ClassVar[str] = "ia3"

    targets: tuple[str, ...] = IA3_TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._set("targets", check_names(owner, "targets", self.targets, IA3_TARGETS))
        self._set("layers", check_layers(owner, self.layers))


class IA3Linear(WrappedLinear):
    """A projection whose input and/or output row blocks are rescaled by learned vectors.

    ``ia3_scale.k`` / ``ia3_scale.v`` multiply the key / value outputs (their row blocks in a packed
    projection); ``ia3_scale.ff`` multiplies the input of the feed-forward output projection.
    All start at one.

    Parameters
    ----------
    base
        The plain ``nn.Linear`` to wrap; its weight and bias are kept (same objects, same names).
    out_blocks
        ``"q"``/``"k"``/``"v"`` output blocks to rescale (may be empty).
    scale_input
        Rescale the input features (``ia3_scale.ff``).
    packed
        The row blocks ``base`` packs, in order; ``None`` treats q/k/v blocks as thirds.

    Examples
    --------
    >>> layer = IA3Linear(nn.Linear(8, 24), ["k", "v"], scale_input=False)
    >>> sorted(layer.ia3_scale)
    ['k', 'v']
    """

    def __init__(
        self,
        base: nn.Linear,
        out_blocks: Sequence[str],
        scale_input: bool,
        *,
        packed: Sequence[str] | None = None,
    ) -> None:
        super().__init__(base)
        self.slices = block_slices(self.out_features, out_blocks, packed) if out_blocks else {}
        self.ia3_scale = nn.ParameterDict()
        for name, (start, stop) in self.slices.items():
            self.ia3_scale[name] = nn.Parameter(torch.ones(stop - start, **self.factory))
        self.scale_input = scale_input
        if scale_input:
            self.ia3_scale["ff"] = nn.Parameter(torch.ones(self.in_features, **self.factory))

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


def apply_ia3(encoder: FoundationEncoder, config: IA3Config | None = None) -> FoundationEncoder:
    """Add IA3 rescaling vectors (initialised to one) to ``encoder``, in place.

    Parameters
    ----------
    encoder
        A foundation-model encoder (pretrained weights loaded).
    config
        :class:`IA3Config`; ``None`` rescales keys, values and FFN activations of every layer.

    Returns
    -------
    The same encoder, with unchanged outputs until the vectors move from one.

    Examples
    --------
    >>> from scdlkit.foundation.peft import IA3Config, apply_ia3
    >>> apply_ia3(encoder, IA3Config(targets=("k", "v")))  # doctest: +SKIP
    """
    check_encoder(encoder)
    config = check_config("apply_ia3", config, IA3Config)
    targets = encoder.adaptation_targets
    groups = projection_groups(targets, [t for t in config.targets if t in QKV])
    ffn_out = targets.projections["linear2"][0]
    for layer in selected_layers(encoder, config.layers, "IA3Config"):
        for path, (names, packed) in groups.items():
            replace_module(
                layer,
                path,
                lambda base, names=names, packed=packed: IA3Linear(
                    base, names, scale_input=False, packed=packed
                ),
            )
        if "ff" in config.targets:
            replace_module(layer, ffn_out, lambda base: IA3Linear(base, (), scale_input=True))
    return encoder


register_peft_method(name="ia3", config_cls=IA3Config, apply=apply_ia3)
