"""Reading ``best_model.pt`` into :class:`ScGPTEncoder`, loudly.

Upstream's loaders keep keys whose name and shape match and drop the rest silently, which is how
attention weights went missing in several reported set-ups. Here every key is accounted for: the
encoder must be complete and well-shaped, and what was ignored is reported.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from scdlkit.foundation._device import resolve_device
from scdlkit.foundation.models._load_report import CheckpointLoadReport
from scdlkit.foundation.models._weights import check_state_dict, torch_load_tensors
from scdlkit.foundation.models.scgpt._checkpoint import ScGPTCheckpoint, resolve_checkpoint
from scdlkit.foundation.models.scgpt._model import ScGPTEncoder

__all__ = ["CheckpointLoadReport", "load_scgpt_model", "load_state_dict_file"]

logger = logging.getLogger("scdlkit")

# The three attention layouts found in the wild, mapped onto ours (official flash-attn ``Wqkv``).
_KEY_RENAMES = (
    (re.compile(r"(self_attn)\._impl\.(Wqkv|out_proj)\."), r"\1.\2."),
    (re.compile(r"(self_attn)\.in_proj_weight$"), r"\1.Wqkv.weight"),
    (re.compile(r"(self_attn)\.in_proj_bias$"), r"\1.Wqkv.bias"),
)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict of tensors with ``weights_only=True``; refuse anything else."""
    path = Path(path)
    obj = torch_load_tensors(path)
    if (
        isinstance(obj, dict)
        and "model_state_dict" in obj
        and isinstance(obj["model_state_dict"], dict)
    ):
        obj = obj["model_state_dict"]
    return check_state_dict(obj, path)


def _normalise_keys(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, value in state.items():
        new = key.removeprefix("module.")
        for pattern, repl in _KEY_RENAMES:
            new = pattern.sub(repl, new)
        if new != key:
            renamed[key] = new
        out[new] = value
    return out, renamed


def load_encoder_weights(
    model: ScGPTEncoder, state: dict[str, torch.Tensor]
) -> CheckpointLoadReport:
    """Copy ``state`` into ``model``; every encoder key must be present with the right shape.

    Keys of other modules (pretraining heads such as ``decoder.*``) are ignored and reported;
    keys under the encoder's own modules that it does not use (a layer beyond ``nlayers``) are an
    error, as missing ones are.
    """
    state, renamed = _normalise_keys(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        msg = (
            f"checkpoint is missing encoder weights: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            + ". Refusing to initialise them at random; is this a complete scGPT checkpoint?"
        )
        raise ValueError(msg)
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            msg = (
                f"checkpoint weight {key!r} has shape {tuple(state[key].shape)} but the model "
                f"built from args.json/vocab.json expects {tuple(tensor.shape)}."
            )
            raise ValueError(msg)
    # keys under the encoder's own modules that it does not use mean args.json does not describe
    # these weights (e.g. fewer nlayers than the file holds): refused, never dropped silently
    modules = {k.split(".", 1)[0] for k in expected}
    unused = [k for k in state if k not in expected and k.split(".", 1)[0] in modules]
    if unused:
        ckpt = getattr(model, "checkpoint", None)
        where = f"{ckpt.weights_path} holds" if ckpt is not None else "the checkpoint holds"
        msg = (
            f"{where} encoder weights that the model built from args.json does not use: "
            f"{', '.join(unused[:8])}"
            + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            + ". args.json does not match the weights (compare nlayers, embsize, d_hid); use the "
            "args.json released with them."
        )
        raise ValueError(msg)
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    report = CheckpointLoadReport(
        used=list(expected),
        ignored=[k for k in state if k not in expected],
        renamed={k: v for k, v in renamed.items() if v in expected},
    )
    logger.debug("scGPT checkpoint loaded: %s", report)
    return report


def build_encoder(checkpoint: ScGPTCheckpoint) -> ScGPTEncoder:
    """An encoder of the checkpoint's architecture with random weights (no file read)."""
    encoder = ScGPTEncoder(
        checkpoint.args, n_tokens=len(checkpoint.vocab), pad_id=checkpoint.pad_id
    )
    encoder.checkpoint = checkpoint  # so loading errors name its files
    return encoder


def load_scgpt_model(
    checkpoint: str | os.PathLike | ScGPTCheckpoint = "whole-human",
    *,
    device: str | torch.device = "auto",
) -> ScGPTEncoder:
    """Load a pretrained scGPT encoder for embedding, in eval mode.

    Parameters
    ----------
    checkpoint
        Official name (looked up in the local cache, see
        :func:`~scdlkit.foundation.default_cache_dir`) or a folder holding ``args.json``,
        ``vocab.json`` and ``best_model.pt``.
    device
        ``"auto"`` (CUDA, then MPS, then CPU), or any torch device.

    Returns
    -------
    The encoder; ``model.checkpoint`` is the resolved :class:`ScGPTCheckpoint` and
    ``model.load_report`` the :class:`CheckpointLoadReport` (keys used and ignored).

    Examples
    --------
    >>> model = sck.foundation.load_scgpt_model("path/to/scGPT_human")  # doctest: +SKIP
    >>> print(model.load_report)  # doctest: +SKIP
    """
    ckpt = resolve_checkpoint(checkpoint)
    model = build_encoder(ckpt)
    model.load_report = load_encoder_weights(model, load_state_dict_file(ckpt.weights_path))
    model.checkpoint = ckpt
    return model.to(resolve_device(device)).eval()
