"""Reading Geneformer weights into :class:`GeneformerEncoder`, every key accounted for.

The official files are ``BertForMaskedLM`` state dicts: the encoder under ``bert.``, the masked-LM
head under ``cls.predictions.``. Older ``.bin`` saves also carry ``bert.embeddings.position_ids``
(a buffer) and fine-tuned ones a pooler and a classifier. Those are ignored and reported; an
encoder weight that is missing or has the wrong shape is an error, never a random initialisation.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from scdlkit._shared.hardware import resolve_device
from scdlkit.foundation.models._load_report import CheckpointLoadReport
from scdlkit.foundation.models._weights import check_state_dict, torch_load_tensors
from scdlkit.foundation.models.geneformer._checkpoint import (
    GeneformerCheckpoint,
    resolve_geneformer_checkpoint,
)
from scdlkit.foundation.models.geneformer._dictionaries import GeneformerDictionaries
from scdlkit.foundation.models.geneformer._model import GeneformerEncoder

__all__ = [
    "GeneformerLoadReport",
    "build_geneformer_encoder",
    "load_geneformer_model",
    "load_geneformer_weights",
    "read_geneformer_weights",
]

logger = logging.getLogger("scdlkit")

PREFIX = "bert."
#: Keys that are not encoder weights: position-id buffers, the MLM head, pooler and classifiers.
_IGNORED = re.compile(r"^(embeddings\.position_ids$|pooler\.|cls\.|classifier\.)")
#: TensorFlow-era LayerNorm names, which transformers still renames on load.
_RENAMES = (
    (re.compile(r"(LayerNorm)\.gamma$"), r"\1.weight"),
    (re.compile(r"(LayerNorm)\.beta$"), r"\1.bias"),
)


#: Geneformer's name for the load report (the same class as scGPT's).
GeneformerLoadReport = CheckpointLoadReport


def read_geneformer_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file: ``.safetensors``, or a ``.bin`` with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    path
        ``model.safetensors`` or ``pytorch_model.bin``.

    Returns
    -------
    dict
        ``{key: tensor}`` as stored.

    Raises
    ------
    ValueError
        When the file is not a readable state dict (truncated, corrupted, or holding pickled
        objects other than tensors).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            msg = (
                f"{path} is not a readable safetensors file ({err}); it is probably truncated or "
                "corrupted. Copy the checkpoint again."
            )
            raise ValueError(msg) from err
    return check_state_dict(torch_load_tensors(path), path)


def _model_key(key: str, *, prefixed: bool) -> str | None:
    """The encoder's name for a file key, or ``None`` when the key is not an encoder weight."""
    if prefixed:
        if not key.startswith(PREFIX):
            return None
        key = key[len(PREFIX) :]
    if _IGNORED.match(key):
        return None
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def load_geneformer_weights(
    model: GeneformerEncoder, state: dict[str, torch.Tensor]
) -> GeneformerLoadReport:
    """Copy ``state`` (a ``BertForMaskedLM`` or ``BertModel`` state dict) into ``model``.

    Parameters
    ----------
    model
        The encoder, built from the same checkpoint's ``config.json``.
    state
        The weights; keys under ``bert.`` (or unprefixed, for a bare ``BertModel``).

    Returns
    -------
    GeneformerLoadReport
        Keys used, ignored and renamed.

    Raises
    ------
    ValueError
        When an encoder weight is missing or has another shape than ``config.json`` implies,
        or the file holds encoder weights the model does not have (e.g. more layers).
    """
    prefixed = any(k.startswith(PREFIX) for k in state)
    expected = model.state_dict()
    where = model.checkpoint.weights_path if model.checkpoint is not None else "the weights file"
    mapped: dict[str, str] = {}
    ignored: list[str] = []
    for key in state:
        name = _model_key(key, prefixed=prefixed)
        if name is None:
            ignored.append(key)
        else:
            mapped[key] = name
    by_model = {name: key for key, name in mapped.items()}
    missing = [k for k in expected if k not in by_model]
    if missing:
        msg = (
            f"{where} is missing encoder weights: "
            + ", ".join((PREFIX if prefixed else "") + k for k in missing[:8])
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            + ". Refusing to initialise them at random; is this a complete Geneformer checkpoint?"
        )
        raise ValueError(msg)
    unused = [key for key, name in mapped.items() if name not in expected]
    if unused:
        msg = (
            f"{where} holds encoder weights that the model built from config.json does not "
            f"have: {', '.join(unused[:8])}"
            + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            + ". config.json does not describe these weights (compare num_hidden_layers); use "
            "the config.json released with them."
        )
        raise ValueError(msg)
    for name, tensor in expected.items():
        stored = state[by_model[name]]
        if stored.shape != tensor.shape:
            msg = (
                f"{where}: weight {by_model[name]!r} has shape {tuple(stored.shape)} but the "
                f"model built from config.json expects {tuple(tensor.shape)}; use the "
                "config.json released with these weights."
            )
            raise ValueError(msg)
    model.load_state_dict({name: state[key] for name, key in by_model.items()}, strict=True)
    report = GeneformerLoadReport(
        used=list(mapped),
        ignored=ignored,
        renamed={k: v for k, v in mapped.items() if (PREFIX + v if prefixed else v) != k},
    )
    logger.debug("Geneformer checkpoint loaded: %s", report)
    return report


def build_geneformer_encoder(checkpoint: GeneformerCheckpoint) -> GeneformerEncoder:
    """An encoder of the checkpoint's architecture with fresh weights (no weights file read).

    Parameters
    ----------
    checkpoint
        The resolved checkpoint.

    Returns
    -------
    GeneformerEncoder
        With ``pad_id``, ``cls_id`` and ``eos_id`` from its dictionaries; ``.checkpoint`` set.
    """
    encoder = GeneformerEncoder(
        checkpoint.config,
        pad_id=checkpoint.pad_id,
        cls_id=checkpoint.cls_id,
        eos_id=checkpoint.eos_id,
    )
    encoder.checkpoint = checkpoint
    return encoder


def load_geneformer_model(
    path: str | os.PathLike | GeneformerCheckpoint,
    *,
    dictionaries: str | os.PathLike | dict | GeneformerDictionaries | None = None,
    device: str | torch.device = "cpu",
    version: str | None = None,
) -> GeneformerEncoder:
    """Load a pretrained Geneformer encoder, in eval mode.

    Parameters
    ----------
    path
        A checkpoint folder (``config.json`` and ``model.safetensors`` or
        ``pytorch_model.bin``), or a resolved :class:`GeneformerCheckpoint`.
    dictionaries
        Where the dictionaries are, when not beside the checkpoint; see
        :func:`~scdlkit.foundation.models.geneformer.resolve_geneformer_checkpoint`.
    device
        ``"cpu"``, ``"auto"`` (CUDA, then MPS, then CPU) or any torch device.
    version
        ``"V1"`` or ``"V2"``: must agree with the dictionaries; ``None`` takes theirs.

    Returns
    -------
    GeneformerEncoder
        ``model.checkpoint`` is the :class:`GeneformerCheckpoint`, ``model.load_report`` the
        :class:`GeneformerLoadReport` (keys used and ignored).

    Examples
    --------
    >>> model = load_geneformer_model("Geneformer/Geneformer-V2-104M")  # doctest: +SKIP
    >>> print(model.load_report)  # doctest: +SKIP
    """
    ckpt = resolve_geneformer_checkpoint(path, dictionaries=dictionaries, version=version)
    model = build_geneformer_encoder(ckpt)
    model.load_report = load_geneformer_weights(model, read_geneformer_weights(ckpt.weights_path))
    return model.to(resolve_device(device)).eval()
