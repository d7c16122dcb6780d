"""Foundation models behind one contract: one folder per model, one registry line each.

Each model's folder (``scgpt/``, ...) holds everything that model knows: checkpoint layout and
loading, gene matching, tokenisation, the encoder and where adaptation modules attach
(:class:`~scdlkit.foundation.models._contract.AdaptationTargets`). The rest of scdlkit reaches a
model only through its :class:`~scdlkit.foundation.models._contract.ModelCard`, found here from a
checkpoint folder's layout or a ``model=`` name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from scdlkit.foundation.models._contract import AdaptationTargets, FoundationEncoder, ModelCard
from scdlkit.foundation.models.geneformer._card import GENEFORMER_CARD
from scdlkit.foundation.models.scgpt._card import SCGPT_CARD

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "AdaptationTargets",
    "FoundationEncoder",
    "ModelCard",
    "is_model_checkpoint",
    "load_encoder",
    "model_card",
    "register_model",
    "resolve_model_checkpoint",
]

#: Registered models by name, in display order.
MODELS: dict[str, ModelCard] = {card.name: card for card in (SCGPT_CARD, GENEFORMER_CARD)}

#: The model an official checkpoint name (e.g. ``"whole-human"``) refers to.
DEFAULT_MODEL = "scgpt"


def register_model(card: ModelCard) -> ModelCard:
    """Add ``card`` to :data:`MODELS` (a name may be registered once)."""
    if card.name in MODELS and MODELS[card.name] is not card:
        msg = f"a model named {card.name!r} is already registered."
        raise ValueError(msg)
    MODELS[card.name] = card
    return card


def _known() -> str:
    return ", ".join(repr(name) for name in MODELS)


def model_card(model: str | Any) -> ModelCard:
    """The card of a model name or of a resolved checkpoint (its ``model_name``)."""
    name = model if isinstance(model, str) else getattr(model, "model_name", None)
    if name not in MODELS:
        msg = f"unknown foundation model {name!r}; registered: {_known()}."
        raise ValueError(msg)
    return MODELS[name]


def is_model_checkpoint(value: Any) -> bool:
    """Whether ``value`` is a checkpoint object some registered model resolved."""
    return getattr(value, "model_name", None) in MODELS and not isinstance(value, str | Path)


def resolve_model_checkpoint(
    checkpoint: Any, *, model: str | None = None, options: dict[str, Any] | None = None
) -> Any:
    """Resolve ``checkpoint`` with the model its folder's layout (or ``model``) names.

    Parameters
    ----------
    checkpoint
        A checkpoint folder, an official name (of :data:`DEFAULT_MODEL`), or a resolved
        checkpoint object.
    model
        A registered model name; ``None`` reads it from the folder's layout.
    options
        Further arguments of the model's ``resolve`` (what a checkpoint's ``resolve_options()``
        recorded, e.g. where Geneformer's dictionaries are); needs ``model``.

    Returns
    -------
    The model's checkpoint object (``model_name`` says which model).

    Raises
    ------
    ValueError
        ``model`` unknown, or disagreeing with a resolved checkpoint or with the folder's layout.
    """
    if model is not None:
        card = model_card(model)
    if is_model_checkpoint(checkpoint):
        if model is not None and checkpoint.model_name != model:
            msg = f"model={model!r} but the checkpoint is a {checkpoint.model_name!r} checkpoint."
            raise ValueError(msg)
        return checkpoint
    if model is not None:
        return card.resolve(checkpoint, **(options or {}))
    if isinstance(checkpoint, str | os.PathLike):
        folder = Path(checkpoint).expanduser()
        if folder.is_dir():
            matches = [c for c in MODELS.values() if c.recognises(folder)]
            if len(matches) > 1:
                msg = (
                    f"{folder} looks like a checkpoint of {', '.join(c.title for c in matches)}; "
                    "pass model= to say which."
                )
                raise ValueError(msg)
            if matches:
                return matches[0].resolve(checkpoint)
    return MODELS[DEFAULT_MODEL].resolve(checkpoint)


def load_encoder(
    checkpoint: Any, *, device: str | torch.device = "cpu", model: str | None = None
) -> Any:
    """The pretrained encoder of ``checkpoint``, in eval mode on ``device``.

    ``encoder.checkpoint`` is the resolved checkpoint and ``encoder.load_report`` what happened
    to each key of its weights.

    Parameters
    ----------
    checkpoint, model
        As for :func:`resolve_model_checkpoint`.
    device
        A torch device (already resolved: no ``"auto"``).
    """
    ckpt = resolve_model_checkpoint(checkpoint, model=model)
    card = model_card(ckpt)
    encoder = card.build(ckpt)
    encoder.load_report = card.load_weights(encoder, card.read_weights(ckpt))
    encoder.checkpoint = ckpt
    return encoder.to(device).eval()
