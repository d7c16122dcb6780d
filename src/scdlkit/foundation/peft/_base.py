"""What every adaptation method shares: the config base class, validation, wrapper bases, freezing.

Every method is an explicit wrapper module that *replaces* a sub-module of an encoder layer, or
fills the attention's ``prefix`` slot. Which sub-module plays which role (query, key, value,
attention output, feed-forward in and out, the post-attention norm) comes from the encoder's
:class:`~scdlkit.foundation.models._contract.AdaptationTargets` table, so no method names a model's
modules. Our layers call every sub-module in ``train()`` and ``eval()`` alike (no fused fast path,
SCGPT_NOTES.md section 6), so an adaptation is never silently skipped at inference. Wrappers keep
the wrapped layer's ``weight`` and ``bias`` under their original state-dict names, so the
pretrained keys stay where the checkpoint has them and only the new parameters are added.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scdlkit.foundation.models._contract import AdaptationTargets, FoundationEncoder

__all__ = ["PEFTConfig", "freeze_except_peft", "peft_parameter_names"]

#: Names of the query, key and value row blocks of a packed projection.
QKV = ("q", "k", "v")


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def check_positive_int(owner: str, name: str, value: Any) -> int:
    """``value`` as a Python int (numpy integers accepted); ValueError unless positive."""
    if not _is_int(value) or value <= 0:
        msg = f"{owner}.{name} must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_dropout(owner: str, value: Any) -> float:
    if (
        isinstance(value, bool | np.bool_)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        msg = f"{owner}.dropout must be a number in [0, 1), got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        msg = f"{owner}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
        raise ValueError(msg)


def check_names(owner: str, name: str, value: Any, choices: Sequence[str]) -> tuple[str, ...]:
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


def check_layers(owner: str, value: Any) -> tuple[int, ...] | None:
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
# configuration base


@dataclass(frozen=True)
class PEFTConfig:
    """Base class of the adaptation configurations; holds the (de)serialisation.

    Subclasses are frozen, validated dataclasses. ``strategy`` names the ``tuning_strategy`` each
    belongs to.

    Examples
    --------
    >>> from scdlkit.foundation.peft import LoRAConfig
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
        >>> from scdlkit.foundation.peft import IA3Config
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
        >>> from scdlkit.foundation.peft import LoRAConfig
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


# --------------------------------------------------------------------------------------------
# wrapper module bases


class PEFTModule(nn.Module):
    """Base of the modules owning adaptation parameters (see :func:`peft_parameter_names`)."""

    def peft_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(local name, parameter)`` of the adaptation's own parameters (not the base weights)."""
        for name, param in self.named_parameters():
            if name not in ("weight", "bias"):
                yield name, param


class WrappedLinear(PEFTModule):
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

    @property
    def factory(self) -> dict[str, Any]:
        """``device`` and ``dtype`` of the wrapped weight, for creating new parameters."""
        return {"device": self.weight.device, "dtype": self.weight.dtype}

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def block_slices(
    out_features: int, names: Sequence[str], packed: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """Row ranges of ``names`` in a projection's output.

    ``packed`` lists the equal row blocks the projection holds, in order (a packed q/k/v projection:
    ``("q", "k", "v")``); each name gets its block. An empty ``packed`` gives every name all rows.
    ``None`` infers: q/k/v names are thirds of a packed projection.
    """
    if packed is None:
        packed = QKV if all(n in QKV for n in names) else ()
    if packed:
        d = out_features // len(packed)
        return {n: (packed.index(n) * d, (packed.index(n) + 1) * d) for n in names}
    return {n: (0, out_features) for n in names}


# --------------------------------------------------------------------------------------------
# applying


def check_encoder(encoder: Any) -> None:
    if not isinstance(encoder, FoundationEncoder):
        msg = (
            f"expected a foundation-model encoder (e.g. load_scgpt_model's), got "
            f"{type(encoder).__name__}."
        )
        raise TypeError(msg)


def check_config(apply_name: str, config: Any, config_cls: type[PEFTConfig]) -> PEFTConfig:
    """``config``, or ``config_cls()`` for ``None``; refuses another type."""
    config = config_cls() if config is None else config
    if not isinstance(config, config_cls):
        article = "an" if config_cls.__name__[0] in "AEIOU" else "a"
        msg = f"{apply_name} needs {article} {config_cls.__name__}, got {type(config).__name__}."
        raise ValueError(msg)
    return config


def selected_layers(
    encoder: FoundationEncoder, layers: tuple[int, ...] | None, owner: str
) -> list[nn.Module]:
    """The encoder layers named by a config's ``layers`` (all for ``None``), checked in range."""
    stack = list(encoder.get_submodule(encoder.adaptation_targets.layers))
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


def projection_groups(
    targets: AdaptationTargets, roles: Sequence[str]
) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """``roles`` grouped by the linear that computes them: ``path -> (names, packed blocks)``.

    A role's name is its block in a packed projection, else the role itself.
    """
    groups: dict[str, tuple[list[str], tuple[str, ...]]] = {}
    for role in roles:
        path, block = targets.projections[role]
        names, _ = groups.setdefault(path, ([], targets.packed_blocks(path)))
        names.append(block or role)
    return groups


def replace_module(layer: nn.Module, path: str, wrap: Any) -> nn.Module:
    """Replace the sub-module at ``path`` of ``layer`` by ``wrap(old)``; returns the new one."""
    parent_path, _, child = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    new = wrap(getattr(parent, child))
    setattr(parent, child, new)
    return new


# --------------------------------------------------------------------------------------------
# trainable parameters


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
    >>> from scdlkit.foundation.peft import peft_parameter_names
    >>> peft_parameter_names(encoder)[:2]  # doctest: +SKIP
    ['transformer_encoder.layers.0.self_attn.<q, k, v projection>.lora_A.q', ...]
    """
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, PEFTModule):
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
    >>> from scdlkit.foundation.peft import apply_lora, freeze_except_peft
    >>> freeze_except_peft(apply_lora(encoder))  # doctest: +SKIP
    """
    keep = set(peft_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return model
