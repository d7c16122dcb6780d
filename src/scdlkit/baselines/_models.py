"""Plain deep-learning baselines as :class:`torch.nn.Module` s that follow the Trainer protocol.

Every model takes the collated batch dict and reads ``batch["x"]``, a ``(B, n_features)`` float
tensor of standardised log-expression (see :class:`scdlkit.baselines.TaskRunner`).

- :class:`MLPClassifier` returns ``"logits"`` and ``"latent"`` (``task="classification"``).
- :class:`AutoEncoder` and :class:`VAE` return ``"loss"``, ``"latent"`` and ``"reconstruction"``
  (``task="representation"``); the Trainer optimises ``"loss"``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_CLASSES",
    "TASKS",
    "VALID_COMBINATIONS",
    "VAE",
    "AutoEncoder",
    "MLPClassifier",
    "build_model",
    "resolve_task",
]

TASKS = ("classification", "representation")
#: The task each model solves; other pairs are rejected.
VALID_COMBINATIONS = {
    "mlp": "classification",
    "autoencoder": "representation",
    "vae": "representation",
}
_VALID_TEXT = (
    "model='mlp' with task='classification', or model='autoencoder'/'vae' with "
    "task='representation'"
)


def resolve_task(model: Any, task: Any) -> str:
    """The task of ``model`` (``task=None`` infers it); a ValueError names the valid pairs."""
    if model not in VALID_COMBINATIONS:
        msg = f"model={model!r} is not a baseline; choose 'mlp', 'autoencoder' or 'vae'."
        raise ValueError(msg)
    if task is None:
        return VALID_COMBINATIONS[model]
    if task not in TASKS:
        msg = f"task={task!r}; choose 'classification' or 'representation' (or None to infer)."
        raise ValueError(msg)
    if VALID_COMBINATIONS[model] != task:
        msg = f"model={model!r} cannot do task={task!r}; valid combinations: {_VALID_TEXT}."
        raise ValueError(msg)
    return task


def _stack(sizes: Sequence[int], dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout`` for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPClassifier(nn.Module):
    """Feed-forward classifier with a linear bottleneck that serves as the cell latent.

    ``x -> [Linear, ReLU, Dropout] per hidden size -> Linear(latent_dim)`` is the latent;
    ``latent -> ReLU -> Dropout -> Linear(n_classes)`` gives the logits.

    Parameters
    ----------
    n_features
        Number of input genes.
    n_classes
        Number of classes.
    hidden_dims
        Widths of the hidden layers.
    latent_dim
        Width of the bottleneck returned as ``"latent"``.
    dropout
        Dropout after every hidden activation (and before the output layer).

    Examples
    --------
    >>> import torch
    >>> from scdlkit.baselines import MLPClassifier
    >>> model = MLPClassifier(20, 3, hidden_dims=(16,), latent_dim=4)
    >>> out = model({"x": torch.randn(5, 20)})
    >>> out["logits"].shape, out["latent"].shape
    (torch.Size([5, 3]), torch.Size([5, 4]))
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        hidden_dims: Sequence[int] = (256, 128),
        latent_dim: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.config = {
            "n_features": int(n_features),
            "n_classes": int(n_classes),
            "hidden_dims": [int(h) for h in hidden_dims],
            "latent_dim": int(latent_dim),
            "dropout": float(dropout),
        }
        sizes = [int(n_features), *self.config["hidden_dims"]]
        self.encoder = nn.Sequential(_stack(sizes, dropout), nn.Linear(sizes[-1], int(latent_dim)))
        head: list[nn.Module] = [nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(int(latent_dim), int(n_classes)))
        self.head = nn.Sequential(*head)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latent = self.encoder(batch["x"])
        return {"logits": self.head(latent), "latent": latent}


class AutoEncoder(nn.Module):
    """Deterministic autoencoder; ``"loss"`` is the mean squared reconstruction error.

    Parameters
    ----------
    n_features
        Number of input genes.
    hidden_dims
        Widths of the encoder's hidden layers; the decoder mirrors them.
    latent_dim
        Width of the latent code.
    dropout
        Dropout after every hidden activation.

    Examples
    --------
    >>> import torch
    >>> from scdlkit.baselines import AutoEncoder
    >>> out = AutoEncoder(20, hidden_dims=(16,), latent_dim=4)({"x": torch.randn(5, 20)})
    >>> out["latent"].shape, out["reconstruction"].shape, out["loss"].ndim
    (torch.Size([5, 4]), torch.Size([5, 20]), 0)
    """

    def __init__(
        self,
        n_features: int,
        *,
        hidden_dims: Sequence[int] = (256, 128),
        latent_dim: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.config = {
            "n_features": int(n_features),
            "hidden_dims": [int(h) for h in hidden_dims],
            "latent_dim": int(latent_dim),
            "dropout": float(dropout),
        }
        sizes = [int(n_features), *self.config["hidden_dims"]]
        self.encoder = nn.Sequential(_stack(sizes, dropout), nn.Linear(sizes[-1], int(latent_dim)))
        back = [int(latent_dim), *reversed(self.config["hidden_dims"])]
        self.decoder = nn.Sequential(_stack(back, dropout), nn.Linear(back[-1], int(n_features)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        latent = self.encoder(x)
        reconstruction = self.decoder(latent)
        loss = torch.mean((reconstruction.float() - x.float()) ** 2)
        return {"loss": loss, "latent": latent, "reconstruction": reconstruction}


class VAE(nn.Module):
    """Variational autoencoder with a Gaussian decoder of unit variance.

    ``"loss"`` is the negative evidence lower bound per gene:
    ``mean over cells of (0.5 * sum((x - x_hat)^2) + kl_weight * KL(q(z|x) || N(0, I)))``
    divided by ``n_features``. In training ``z`` is sampled; in ``eval()`` mode ``z`` is the
    posterior mean, so ``"latent"`` (the posterior mean) and ``"reconstruction"`` are
    deterministic.

    Parameters
    ----------
    n_features
        Number of input genes.
    hidden_dims
        Widths of the encoder's hidden layers; the decoder mirrors them.
    latent_dim
        Width of the latent code.
    dropout
        Dropout after every hidden activation.
    kl_weight
        Weight of the KL term (``1.0`` is the ELBO, other values a beta-VAE).

    Examples
    --------
    >>> import torch
    >>> from scdlkit.baselines import VAE
    >>> model = VAE(20, hidden_dims=(16,), latent_dim=4).eval()
    >>> out = model({"x": torch.randn(5, 20)})
    >>> out["latent"].shape, out["reconstruction"].shape
    (torch.Size([5, 4]), torch.Size([5, 20]))
    """

    def __init__(
        self,
        n_features: int,
        *,
        hidden_dims: Sequence[int] = (256, 128),
        latent_dim: int = 32,
        dropout: float = 0.1,
        kl_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = {
            "n_features": int(n_features),
            "hidden_dims": [int(h) for h in hidden_dims],
            "latent_dim": int(latent_dim),
            "dropout": float(dropout),
            "kl_weight": float(kl_weight),
        }
        sizes = [int(n_features), *self.config["hidden_dims"]]
        self.encoder = _stack(sizes, dropout)
        self.mean = nn.Linear(sizes[-1], int(latent_dim))
        self.log_var = nn.Linear(sizes[-1], int(latent_dim))
        back = [int(latent_dim), *reversed(self.config["hidden_dims"])]
        self.decoder = nn.Sequential(_stack(back, dropout), nn.Linear(back[-1], int(n_features)))
        self.kl_weight = float(kl_weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        hidden = self.encoder(x)
        mean = self.mean(hidden)
        log_var = self.log_var(hidden).clamp(-10.0, 10.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var) if self.training else mean
        reconstruction = self.decoder(z)
        squared = ((reconstruction.float() - x.float()) ** 2).sum(dim=1)
        kl = -0.5 * (1 + log_var - mean**2 - log_var.exp()).float().sum(dim=1)
        loss = (0.5 * squared + self.kl_weight * kl).mean() / x.shape[1]
        return {"loss": loss, "latent": mean, "reconstruction": reconstruction}


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": MLPClassifier,
    "autoencoder": AutoEncoder,
    "vae": VAE,
}


def build_model(name: str, config: dict[str, Any]) -> nn.Module:
    """Build a baseline model from its name and the ``config`` dict it records."""
    config = dict(config)
    n_features = config.pop("n_features")
    if name == "mlp":
        return MLPClassifier(n_features, config.pop("n_classes"), **config)
    return MODEL_CLASSES[name](n_features, **config)
