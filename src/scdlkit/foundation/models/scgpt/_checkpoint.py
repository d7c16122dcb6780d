"""Finding an scGPT checkpoint folder on disk and reading its vocabulary and arguments.

Nothing here touches the network: official checkpoints are looked up in a local cache folder, and a
missing one is an error that says where to put the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from scdlkit._shared.cache import CACHE_ENV_VAR, default_cache_dir
from scdlkit._shared.persist import Field, check_fields, sha256_file

__all__ = [
    "ARGS_SCHEMA",
    "CHECKPOINT_FILES",
    "OFFICIAL_CHECKPOINTS",
    "ScGPTCheckpoint",
    "ScGPTModelArgs",
    "resolve_checkpoint",
]

CHECKPOINT_FILES = ("args.json", "vocab.json", "best_model.pt")
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
_DRIVE = "https://drive.google.com/drive/folders/"

#: Official scGPT checkpoints (bowang-lab/scGPT README, "Pretrained scGPT Model Zoo").
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "whole-human": _DRIVE + "1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y",
    "continual-pretrained": _DRIVE + "1_GROJTzXiAV8HB4imruOTk6PEGuNOcgB",
    "brain": _DRIVE + "1vf1ijfQSk7rGdDGpBntR5bi5g6gNt-Gx",
    "blood": _DRIVE + "1kkug5C7NjvXIwQGGaGoqXTk_Lb_pDrBU",
    "heart": _DRIVE + "1GcgXrd7apn6y4Ze_iSCncskX3UsWPY2r",
    "lung": _DRIVE + "16A1DJ30PT6bodt4bWLa4hpS7gbWZQFBG",
    "kidney": _DRIVE + "1S-1AR65DF120kNFpEbWCvRHPhpkGK3kK",
    "pan-cancer": _DRIVE + "13QzLHilYUd0v3HTwa_9n4G4yEF-hdkqa",
}


_ARGS_FIX = "use the args.json released with these weights"


def _at_least(low: int) -> Any:
    return lambda v: None if v >= low else f"is {v}; it must be at least {low}"


def _finite(v: float) -> str | None:
    return None if v == v and abs(v) != float("inf") else "must be a finite number"


#: Type and range of each ``args.json`` field the model reads (all optional: defaults apply).
ARGS_SCHEMA = (
    *(
        Field(name, (int,), required=False, check=_at_least(1))
        for name in ("embsize", "nheads", "d_hid", "nlayers", "n_layers_cls")
    ),
    Field(
        "dropout",
        (float,),
        required=False,
        check=lambda v: None if 0 <= v < 1 else f"is {v}; it must be in [0, 1)",
    ),
    Field("pad_token", (str,), required=False, check=lambda v: None if v else "is empty"),
    Field("pad_value", (float,), required=False, check=_finite),
    Field("mask_value", (float,), required=False, check=_finite),
    # bins 1..n_bins-1 come from n_bins-1 quantile edges: fewer than two edges bin nothing
    Field("n_bins", (int,), required=False, check=_at_least(3)),
    Field("max_seq_len", (int,), required=False, check=_at_least(2)),  # <cls> and one gene
    Field("input_emb_style", (str,), required=False),
)


@dataclass(frozen=True)
class ScGPTModelArgs:
    """The fields of an scGPT ``args.json`` that shape the model and its tokens."""

    embsize: int = 512
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 12
    n_layers_cls: int = 3
    dropout: float = 0.2
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    n_bins: int = 51
    max_seq_len: int = 1200
    input_emb_style: str = "continuous"

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], *, source: str | os.PathLike = "args.json"
    ) -> ScGPTModelArgs:
        """Read the relevant fields of a parsed ``args.json``; absent ones keep their defaults.

        Every field is checked against :data:`ARGS_SCHEMA` (type and range) first.

        Parameters
        ----------
        raw
            The parsed ``args.json``. Keys that are not fields of this class are ignored, and so
            are fields whose value is ``None``; values are taken as they are (no type conversion).
        source
            The file, named in errors.

        Returns
        -------
        ScGPTModelArgs
            The model arguments.

        Raises
        ------
        ValueError
            When ``raw`` is not a mapping, a field has the wrong type or range (sizes positive
            integers, ``n_bins`` at least 3, ``max_seq_len`` at least 2, ``dropout`` in [0, 1)),
            ``input_emb_style`` is not ``"continuous"``, or ``embsize`` is not divisible by
            ``nheads``.

        Examples
        --------
        >>> ScGPTModelArgs.from_dict({"embsize": 512, "nlayers": 12, "lr": 1e-4}).nlayers
        12
        """
        if not isinstance(raw, dict):
            msg = (
                f"{source} must hold a JSON object of model arguments, not "
                f"{type(raw).__name__}; use the args.json released with the checkpoint."
            )
            raise ValueError(msg)
        known = {f: raw[f] for f in cls.__dataclass_fields__ if f in raw and raw[f] is not None}
        check_fields(Path(source), known, ARGS_SCHEMA, fix=_ARGS_FIX)
        args = cls(**known)
        if args.input_emb_style != "continuous":
            msg = (
                f"{source}: field 'input_emb_style' is {args.input_emb_style!r}; only the "
                "'continuous' value encoder of the official checkpoints is supported."
            )
            raise ValueError(msg)
        if args.embsize % args.nheads:
            msg = (
                f"{source}: field 'embsize' ({args.embsize}) is not divisible by field 'nheads' "
                f"({args.nheads}); {_ARGS_FIX}."
            )
            raise ValueError(msg)
        return args

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy.

        Returns
        -------
        dict
            Every field of this class by name; :meth:`from_dict` reads it back.
        """
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class ScGPTCheckpoint:
    """A resolved checkpoint folder: paths, parsed arguments and vocabulary.

    Reading the vocabulary and arguments never touches ``best_model.pt``, so preflight checks stay
    cheap; the weights are read by :func:`scdlkit.foundation.load_scgpt_model`.
    """

    #: Registry name of the model (see :mod:`scdlkit.foundation.models`).
    model_name = "scgpt"

    path: Path
    name: str
    args: ScGPTModelArgs
    raw_args: dict[str, Any] = field(repr=False)
    #: sha256 of the very ``args.json`` bytes parsed into :attr:`args` ("" when built by hand).
    args_sha256: str = field(default="", repr=False, compare=False)

    @property
    def weights_path(self) -> Path:
        """Path of the weights file, ``<path>/best_model.pt``."""
        return self.path / "best_model.pt"

    @cached_property
    def _vocab_read(self) -> tuple[dict[str, int], str]:
        file = self.path / "vocab.json"
        raw, digest = _read_json_with_digest(file, _VOCAB_EXPECTED)
        return _parse_vocab(raw, file), digest

    @property
    def vocab(self) -> dict[str, int]:
        """``{token: id}``; the specials ``<pad>``, ``<cls>``, ``<eoc>`` appended if absent."""
        return self._vocab_read[0]

    #: Files that change outputs, small first (what saved runners pin).
    files = CHECKPOINT_FILES

    #: Tokens besides genes in the model input (``<cls>``).
    n_special_tokens = 1

    @property
    def max_seq_len(self) -> int:
        """Most tokens of one cell's input, ``<cls>`` included (``args.max_seq_len``)."""
        return self.args.max_seq_len

    @property
    def d_model(self) -> int:
        """Width of the encoder's hidden states (``args.embsize``)."""
        return self.args.embsize

    def resolve_options(self) -> dict[str, Any]:
        """What resolving this folder again needs besides the folder: nothing."""
        return {}

    def config_dict(self) -> dict[str, Any]:
        """The architecture as plain JSON values (``args.json``'s fields in use)."""
        return self.args.to_dict()

    @cached_property
    def readable_genes(self) -> frozenset[str]:
        """Gene names the model can read: the vocabulary without its special tokens."""
        specials = {self.args.pad_token, *SPECIAL_TOKENS}
        return frozenset(g for g in self.vocab if g not in specials)

    @property
    def pad_id(self) -> int:
        """Vocabulary id of the padding token (``args.pad_token``, normally ``<pad>``)."""
        return self.vocab[self.args.pad_token]

    @property
    def cls_id(self) -> int:
        """Vocabulary id of ``<cls>``, the token whose output is the cell embedding."""
        return self.vocab["<cls>"]

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 of ``best_model.pt``, recorded in saved runners to detect a different base."""
        return sha256_file(self.weights_path)

    def file_sha256(self, name: str) -> str:
        """sha256 of one of :data:`CHECKPOINT_FILES`: of the bytes read, for the JSON files.

        ``args.json`` and ``vocab.json`` are hashed as they are parsed, so the hash describes the
        arguments and vocabulary in use even if the files change later; ``best_model.pt`` is
        hashed on first request.
        """
        if name == "args.json":
            return self.args_sha256 or sha256_file(self.path / name)
        if name == "vocab.json":
            return self._vocab_read[1]
        if name == "best_model.pt":
            return self.weights_sha256
        msg = f"{name!r} is not a checkpoint file; choose one of {', '.join(CHECKPOINT_FILES)}."
        raise ValueError(msg)

    @property
    def files_sha256(self) -> dict[str, str]:
        """``{file name: sha256}`` of every file that changes outputs; saved runners pin them."""
        return {name: self.file_sha256(name) for name in CHECKPOINT_FILES}


_VOCAB_EXPECTED = "a JSON object of token -> integer id"


def load_vocab(path: Path) -> dict[str, int]:
    """Read ``vocab.json`` and append missing special tokens in the official order."""
    return _parse_vocab(_read_json(Path(path), _VOCAB_EXPECTED), path)


def _parse_vocab(raw: Any, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in raw.values()
    ):
        msg = f"{path} is not an scGPT vocabulary: expected a JSON object of token -> integer id."
        raise ValueError(msg)
    vocab = dict(sorted(raw.items(), key=lambda item: item[1]))
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        msg = f"{path}: token ids must be 0..{len(ids) - 1} without gaps."
        raise ValueError(msg)
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def _missing_message(checkpoint: str, folder: Path) -> str:
    if checkpoint in OFFICIAL_CHECKPOINTS:
        return (
            f"scGPT checkpoint {checkpoint!r} not found in {folder}. scdlkit never downloads "
            f"weights itself: get the folder from {OFFICIAL_CHECKPOINTS[checkpoint]} (the official "
            f"scGPT release) and put its files {', '.join(CHECKPOINT_FILES)} in {folder}, set "
            f"{CACHE_ENV_VAR} to a folder holding 'scgpt/{checkpoint}/', or pass checkpoint=<path "
            "to the folder>."
        )
    return (
        f"checkpoint={checkpoint!r} is neither a folder holding {', '.join(CHECKPOINT_FILES)} nor "
        f"an official scGPT name ({', '.join(OFFICIAL_CHECKPOINTS)})."
    )


def resolve_checkpoint(checkpoint: str | os.PathLike | ScGPTCheckpoint) -> ScGPTCheckpoint:
    """Find a checkpoint folder: an explicit path first, else an official name in the cache.

    Parameters
    ----------
    checkpoint
        A folder holding ``args.json``, ``vocab.json`` and ``best_model.pt``, or an official name
        such as ``"whole-human"`` looked up in :func:`default_cache_dir` ``/scgpt/<name>``.
        An :class:`ScGPTCheckpoint` is returned as it is.

    Returns
    -------
    ScGPTCheckpoint
        The folder (resolved path), its name, its parsed and checked ``args.json`` and its
        vocabulary (read to check that ``pad_token`` is in it); the weights are not read.

    Raises
    ------
    FileNotFoundError
        When no such folder exists, saying where the files go and where upstream publishes them.
    ValueError
        When ``args.json`` or ``vocab.json`` is not valid JSON, ``args.json`` describes an
        invalid or unsupported model (see :meth:`ScGPTModelArgs.from_dict`), or its
        ``pad_token`` is not in the vocabulary; each error names the file and the field.

    Examples
    --------
    >>> ckpt = sck.foundation.resolve_checkpoint("whole-human")  # doctest: +SKIP
    >>> ckpt.args.embsize, len(ckpt.vocab)  # doctest: +SKIP
    """
    if isinstance(checkpoint, ScGPTCheckpoint):
        return checkpoint
    candidate = Path(checkpoint).expanduser()
    name = str(checkpoint)
    if candidate.is_dir():
        folder = candidate
        name = candidate.resolve().name if name not in OFFICIAL_CHECKPOINTS else name
    elif name in OFFICIAL_CHECKPOINTS:
        folder = default_cache_dir() / "scgpt" / name
    else:
        raise FileNotFoundError(_missing_message(name, candidate))
    missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
    if missing:
        msg = _missing_message(name, folder)
        if folder.is_dir():
            msg = f"{folder} lacks {', '.join(missing)}. " + msg
        raise FileNotFoundError(msg)
    raw_args, args_sha256 = _read_json_with_digest(
        folder / "args.json", "a JSON object of model arguments"
    )
    ckpt = ScGPTCheckpoint(
        path=folder.resolve(),
        name=name,
        args=ScGPTModelArgs.from_dict(raw_args, source=folder / "args.json"),
        raw_args=raw_args,
        args_sha256=args_sha256,
    )
    if ckpt.args.pad_token not in ckpt.vocab:
        msg = (
            f"{folder / 'args.json'}: field 'pad_token' is {ckpt.args.pad_token!r}, which "
            f"{folder / 'vocab.json'} does not hold; use the args.json and vocab.json released "
            "together with these weights."
        )
        raise ValueError(msg)
    return ckpt


def _read_json(file: Path, expected: str) -> Any:
    """Parse a JSON file; a syntax error names the file and what it should hold."""
    return _read_json_with_digest(file, expected)[0]


def _read_json_with_digest(file: Path, expected: str) -> tuple[Any, str]:
    """Parse a JSON file and return it with the sha256 of the very bytes parsed."""
    raw = file.read_bytes()
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{file} is not valid JSON ({err}); expected {expected}."
        raise ValueError(msg) from err
