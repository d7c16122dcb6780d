"""How the ``<cls>`` vector is normalised before the classifier head (``input_norm=``).

A concept of its own: the frozen standardiser of the seed, a learned LayerNorm, and statistics
that follow the encoder as it trains, with the factory the annotation model calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scdlkit._shared.arguments import check_choice

__all__ = [
    "DEFAULT_INPUT_NORM",
    "INPUT_NORMS",
    "LEGACY_INPUT_NORM",
    "BatchStandardiser",
    "FeatureStandardiser",
    "LayerNormInput",
    "RawInput",
    "make_input_norm",
]

#: How the ``<cls>`` vector is normalised before the head (``input_norm=``): ``"frozen"`` a fixed
#: per-dimension standardisation on the frozen encoder's features (:class:`FeatureStandardiser`),
#: ``"layernorm"`` a learned LayerNorm trained with the head (:class:`LayerNormInput`),
#: ``"batch"`` per-dimension statistics that follow the encoder as it trains
#: (:class:`BatchStandardiser`), ``"none"`` the raw vector, as upstream scGPT and scPEFT feed it
#: (:class:`RawInput`).
INPUT_NORMS = ("frozen", "layernorm", "batch", "none")
#: What a saved config without ``input_norm`` was fitted with (every model saved before the
#: option existed): fixed for good, whatever the default becomes.
LEGACY_INPUT_NORM = "frozen"
#: The normalisation of a model built without ``input_norm=``.
DEFAULT_INPUT_NORM = LEGACY_INPUT_NORM


class FeatureStandardiser(nn.Module):
    """Fixed per-dimension shift and scale of the ``<cls>`` vector before the head (``"frozen"``).

    Identity unless :meth:`fit` is called. The runner fits it on the training cells' frozen
    features: frozen ``<cls>`` outputs share a large common component, and the small cell-to-cell
    differences the head must read are otherwise hard to learn from. The statistics stay those of
    the frozen encoder while an encoder-trained strategy changes it: with a per-dimension sd of
    0.01-0.04, a change of the encoder of 0.02 reaches the head as a whole unit.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(d_model))
        self.register_buffer("scale", torch.ones(d_model))

    def fit(self, features: torch.Tensor) -> FeatureStandardiser:
        """Set shift and scale to the mean and standard deviation of ``features`` (cells x d)."""
        features = torch.as_tensor(features, dtype=self.shift.dtype, device=self.shift.device)
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class LayerNormInput(nn.LayerNorm):
    """A learned LayerNorm on the ``<cls>`` vector (``"layernorm"``), trained with the head.

    Normalises each cell's vector over its dimensions, so it follows the encoder as it trains
    and adds no gain of its own; its weight and bias start at one and zero. :meth:`fit` does
    nothing (there are no statistics to fit).
    """

    def fit(self, features: torch.Tensor) -> LayerNormInput:
        """Nothing to fit: kept so every classifier-input normalisation takes the same call."""
        return self


class RawInput(nn.Identity):
    """The raw ``<cls>`` vector (``"none"``), as upstream scGPT and scPEFT feed their heads.

    :meth:`fit` does nothing (there are no statistics to fit).
    """

    def fit(self, features: torch.Tensor) -> RawInput:
        """Nothing to fit: kept so every classifier-input normalisation takes the same call."""
        return self


class BatchStandardiser(nn.Module):
    """Per-dimension standardisation with statistics that follow the encoder (``"batch"``).

    As ``nn.BatchNorm1d(d_model, affine=False)``: in training, each batch is standardised with its
    own per-dimension mean and variance (gradients flow through them) and running estimates are
    updated with ``momentum``; in evaluation the running estimates are used. A training batch of
    one cell (no variance) is standardised with the running estimates. :meth:`fit` sets the
    running estimates to the statistics of given features, e.g. the frozen encoder's, which are
    exact at the start of training; without it they start at mean 0 and variance 1.

    Parameters
    ----------
    d_model
        Width of the ``<cls>`` vector.
    momentum
        Weight of each new batch in the running estimates (BatchNorm's default, 0.1).
    eps
        Added to the variance before the square root.
    """

    def __init__(self, d_model: int, *, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.register_buffer("running_var", torch.ones(d_model))

    def fit(self, features: torch.Tensor) -> BatchStandardiser:
        """Set the running mean and variance to those of ``features`` (cells x d)."""
        features = torch.as_tensor(
            features, dtype=self.running_mean.dtype, device=self.running_mean.device
        )
        self.running_mean.copy_(features.mean(0))
        self.running_var.copy_(
            features.var(0) if len(features) > 1 else torch.ones_like(self.running_var)
        )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.running_mean.dtype)
        use_batch = self.training and x.shape[0] > 1
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            training=use_batch,
            momentum=self.momentum,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.running_mean.shape[0]}, momentum={self.momentum}, eps={self.eps}"


def _check_input_norm(value: Any) -> str:
    return check_choice("input_norm", value, INPUT_NORMS)


def make_input_norm(input_norm: str, d_model: int) -> nn.Module:
    """The classifier-input normalisation named ``input_norm`` (one of :data:`INPUT_NORMS`).

    Every one has a ``fit(features)`` method: it sets the frozen standardiser, initialises the
    running statistics of ``"batch"`` and does nothing for ``"layernorm"`` and ``"none"``.

    Parameters
    ----------
    input_norm
        ``"frozen"``, ``"layernorm"``, ``"batch"`` or ``"none"``.
    d_model
        Width of the ``<cls>`` vector.

    Returns
    -------
    The module.

    Examples
    --------
    >>> make_input_norm("layernorm", 8)
    LayerNormInput((8,), eps=1e-05, elementwise_affine=True)
    """
    input_norm = _check_input_norm(input_norm)
    if input_norm == "layernorm":
        return LayerNormInput(d_model)
    if input_norm == "batch":
        return BatchStandardiser(d_model)
    if input_norm == "none":
        return RawInput()
    return FeatureStandardiser(d_model)
