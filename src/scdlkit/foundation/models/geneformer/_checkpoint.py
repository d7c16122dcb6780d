"""Finding a Geneformer checkpoint folder, its BERT configuration and its dictionaries.

A checkpoint is a folder as users download it from the official repository: ``config.json`` and
``model.safetensors`` (or ``pytorch_model.bin``); ``training_args.bin`` beside them is a pickle and
is never read. The dictionaries are not in the model folders upstream: they are looked for in the
folder itself, in its ``dictionaries/`` sub-folder, in a sibling ``dictionaries/`` folder, and in
the repository's ``geneformer/`` package folder (and its ``gene_dictionaries_30m/`` for V1) inside
the folder (the repository root holds a model too) or beside it. The first set whose token
dictionary has the model's ``vocab_size`` is used; ``dictionaries=`` names them explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from scdlkit._shared.persist import sha256_file
from scdlkit.foundation.models.geneformer._dictionaries import (
    GeneformerDictionaries,
    find_dictionary_files,
    load_geneformer_dictionaries,
    read_dictionary,
)

__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "GeneformerCheckpoint",
    "GeneformerConfig",
    "resolve_geneformer_checkpoint",
]

CONFIG_FILE = "config.json"
#: Weight files in the order they are preferred (safetensors needs no unpickling at all).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SUPPORTED_ACTIVATIONS = ("relu", "gelu")
VERSIONS = ("V1", "V2")
_BERT_ARCHITECTURES = frozenset(
    {
        "BertForMaskedLM",
        "BertModel",
        "BertForPreTraining",
        "BertForSequenceClassification",
        "BertForTokenClassification",
    }
)
_CONFIG_FIX = "use the config.json released with these weights"


def _positive_int(raw: dict[str, Any], name: str, source: Path, default: int | None = None) -> int:
    value = raw.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        msg = (
            f"{source}: field {name!r} is {value!r}; it must be a positive integer ({_CONFIG_FIX})."
        )
        raise ValueError(msg)
    return value


def _probability(raw: dict[str, Any], name: str, source: Path, default: float) -> float:
    value = raw.get(name, default)
    if value is None:
        value = default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        msg = f"{source}: field {name!r} is {value!r}; it must be a number in [0, 1)."
        raise ValueError(msg)
    return float(value)


@dataclass(frozen=True)
class GeneformerConfig:
    """The fields of a Geneformer (BERT) ``config.json`` that shape the encoder."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: Any, *, source: str | os.PathLike = CONFIG_FILE) -> GeneformerConfig:
        """Read and check a parsed ``config.json``.

        Parameters
        ----------
        raw
            The parsed file.
        source
            The file, named in errors.

        Returns
        -------
        GeneformerConfig
            The architecture.

        Raises
        ------
        ValueError
            When the file does not describe a BERT (``model_type`` ``"bert"`` or a ``Bert*``
            architecture), uses an activation other than ReLU or GELU, relative position
            embeddings, a decoder or cross-attention, or has a missing or invalid size.

        Examples
        --------
        >>> GeneformerConfig.from_dict(
        ...     {
        ...         "model_type": "bert",
        ...         "vocab_size": 20275,
        ...         "hidden_size": 768,
        ...         "num_hidden_layers": 12,
        ...         "num_attention_heads": 12,
        ...         "intermediate_size": 3072,
        ...         "max_position_embeddings": 4096,
        ...     }
        ... ).hidden_size
        768
        """
        source = Path(source)
        if not isinstance(raw, dict):
            msg = (
                f"{source} must hold a JSON object (a BERT configuration), not "
                f"{type(raw).__name__}."
            )
            raise ValueError(msg)
        architectures = raw.get("architectures") or []
        if raw.get("model_type") != "bert" and not (
            isinstance(architectures, list) and set(architectures) & _BERT_ARCHITECTURES
        ):
            msg = (
                f"{source} describes model_type={raw.get('model_type')!r} "
                f"(architectures {architectures!r}); a Geneformer checkpoint is a BERT "
                "(model_type 'bert', architectures ['BertForMaskedLM'])."
            )
            raise ValueError(msg)
        act = raw.get("hidden_act", "gelu")  # transformers' BertConfig default
        if act not in SUPPORTED_ACTIVATIONS:
            msg = (
                f"{source}: field 'hidden_act' is {act!r}; only {', '.join(SUPPORTED_ACTIVATIONS)} "
                "are supported (every official Geneformer uses relu)."
            )
            raise ValueError(msg)
        position = raw.get("position_embedding_type", "absolute")
        if position != "absolute":
            msg = (
                f"{source}: field 'position_embedding_type' is {position!r}; only absolute "
                "position embeddings (every official Geneformer) are supported."
            )
            raise ValueError(msg)
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            msg = f"{source} describes a BERT decoder; Geneformer is an encoder ({_CONFIG_FIX})."
            raise ValueError(msg)
        sizes = {
            name: _positive_int(raw, name, source)
            for name in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
            )
        }
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            msg = (
                f"{source}: 'hidden_size' ({sizes['hidden_size']}) is not divisible by "
                f"'num_attention_heads' ({sizes['num_attention_heads']}); {_CONFIG_FIX}."
            )
            raise ValueError(msg)
        eps = raw.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            msg = f"{source}: field 'layer_norm_eps' is {eps!r}; it must be a positive number."
            raise ValueError(msg)
        pad = raw.get("pad_token_id", 0)
        if pad is None:
            pad = 0
        if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < sizes["vocab_size"]:
            msg = f"{source}: field 'pad_token_id' is {pad!r}; it must be a token id."
            raise ValueError(msg)
        return cls(
            **sizes,
            type_vocab_size=_positive_int(raw, "type_vocab_size", source, default=2),
            hidden_act=act,
            hidden_dropout_prob=_probability(raw, "hidden_dropout_prob", source, 0.1),
            attention_probs_dropout_prob=_probability(
                raw, "attention_probs_dropout_prob", source, 0.1
            ),
            layer_norm_eps=float(eps),
            pad_token_id=pad,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready copy (``from_dict`` reads it back, given ``model_type``)."""
        return {"model_type": "bert"} | {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class GeneformerCheckpoint:
    """A resolved Geneformer checkpoint: configuration, weights file and dictionaries.

    Resolving reads ``config.json`` and the dictionaries, never the weights; those are read by
    :func:`~scdlkit.foundation.models.geneformer.load_geneformer_model`.

    Attributes
    ----------
    path
        The checkpoint folder (resolved).
    name
        Its folder name, e.g. ``"Geneformer-V2-104M"``.
    config
        The checked architecture.
    raw_config
        ``config.json`` as parsed.
    config_sha256
        sha256 of the bytes of ``config.json`` that were parsed.
    weights_path
        ``model.safetensors``, or ``pytorch_model.bin`` when there is no safetensors file.
    dictionaries
        The token, median, name and mapping dictionaries.
    version
        ``"V2"`` (``<cls>``/``<eos>`` in the token dictionary) or ``"V1"``.
    """

    path: Path
    name: str
    config: GeneformerConfig
    raw_config: dict[str, Any] = field(repr=False)
    config_sha256: str = field(repr=False, compare=False)
    weights_path: Path = field(repr=False)
    dictionaries: GeneformerDictionaries = field(repr=False)
    version: str = "V2"
    model_name: str = field(default="geneformer", init=False)

    @property
    def files(self) -> tuple[str, ...]:
        """Names of the files that change outputs, small first (``files_sha256`` hashes these).

        The dictionaries are named by file name, wherever they were found.
        """
        dicts = tuple(self.dictionaries.files[k].name for k in sorted(self.dictionaries.files))
        return (CONFIG_FILE, *dicts, self.weights_path.name)

    @property
    def n_special_tokens(self) -> int:
        """Tokens besides genes in the model input: 2 (``<cls>``, ``<eos>``) for V2, 0 for V1."""
        return 2 if self.version == "V2" else 0

    @property
    def d_model(self) -> int:
        """Width of the encoder's hidden states (``hidden_size``)."""
        return self.config.hidden_size

    @property
    def max_seq_len(self) -> int:
        """Most tokens of one cell's input, specials included (:attr:`model_input_size`)."""
        return self.model_input_size

    @cached_property
    def readable_genes(self) -> frozenset[str]:
        """Ensembl ids of the token genes (the specials left out)."""
        specials = {"<pad>", "<mask>", "<cls>", "<eos>"}
        return frozenset(g for g in self.dictionaries.token_ids if g not in specials)

    def resolve_options(self) -> dict[str, Any]:
        """What resolving this folder again needs besides the folder: the dictionary files
        (they may live anywhere) and the version, as plain JSON values."""
        return {
            "dictionaries": {k: str(v) for k, v in sorted(self.dictionaries.files.items())},
            "version": self.version,
        }

    def config_dict(self) -> dict[str, Any]:
        """The architecture as plain JSON values, with the version."""
        return self.config.to_dict() | {"version": self.version}

    @property
    def model_input_size(self) -> int:
        """Longest input the model takes, specials included: ``max_position_embeddings``.

        4096 for the official V2 models, 2048 for V1 (upstream's tokenizer sizes).
        """
        return self.config.max_position_embeddings

    @property
    def pad_id(self) -> int:
        """Token id of ``<pad>``."""
        return self.dictionaries.pad_id

    @property
    def cls_id(self) -> int | None:
        """Token id of ``<cls>``; ``None`` for V1."""
        return self.dictionaries.cls_id

    @property
    def eos_id(self) -> int | None:
        """Token id of ``<eos>``; ``None`` for V1."""
        return self.dictionaries.eos_id

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 of the weights file (computed on first request)."""
        return sha256_file(self.weights_path)

    def file_sha256(self, name: str) -> str:
        """sha256 of one of :attr:`files`: of the bytes parsed, for config and dictionaries.

        Parameters
        ----------
        name
            A file name from :attr:`files`.

        Returns
        -------
        str
            Hex digest; the weights are hashed on first request.

        Raises
        ------
        ValueError
            When ``name`` is not one of :attr:`files`.
        """
        if name == CONFIG_FILE:
            return self.config_sha256
        if name == self.weights_path.name:
            return self.weights_sha256
        for kind, path in self.dictionaries.files.items():
            if path.name == name:
                return self.dictionaries.sha256[kind]
        msg = f"{name!r} is not a checkpoint file; choose one of {', '.join(self.files)}."
        raise ValueError(msg)

    @property
    def files_sha256(self) -> dict[str, str]:
        """``{file name: sha256}`` of every file that changes outputs (config, dicts, weights)."""
        return {name: self.file_sha256(name) for name in self.files}


def _dictionary_folders(folder: Path) -> list[Path]:
    """Where dictionaries are looked for, in order (see the module docstring)."""
    parent = folder.parent
    return [
        folder,
        folder / "dictionaries",
        parent / "dictionaries",
        # the repository root holds a model too (V2-316M) beside the ``geneformer/`` package
        folder / "geneformer",
        folder / "geneformer" / "gene_dictionaries_30m",
        parent / "geneformer",
        parent / "geneformer" / "gene_dictionaries_30m",
    ]


def _find_dictionaries(folder: Path, vocab_size: int) -> GeneformerDictionaries:
    """The first dictionary set, in search order, whose token dictionary has ``vocab_size``."""
    seen: list[str] = []
    for where in _dictionary_folders(folder):
        for files in find_dictionary_files(where).values():
            tokens, _ = read_dictionary(files["token"], "token")
            if len(tokens) == vocab_size:
                return load_geneformer_dictionaries(files)
            seen.append(f"{files['token']} ({len(tokens)} tokens)")
    if seen:
        msg = (
            f"{folder / CONFIG_FILE} says vocab_size={vocab_size}, but no token dictionary "
            f"found has that many tokens: {'; '.join(seen)}. Use the dictionaries released with "
            "this model (V2: *_gc104M.pkl, V1: gene_dictionaries_30m/*_gc30M.pkl), or pass "
            "dictionaries=."
        )
        raise ValueError(msg)
    msg = (
        f"no Geneformer dictionaries (token_dictionary*.pkl, gene_median_dictionary*.pkl, "
        f"gene_name_id_dict*.pkl, ensembl_mapping_dict*.pkl) found for {folder}: looked in "
        f"{', '.join(str(p) for p in _dictionary_folders(folder))}. Pass dictionaries= naming "
        "the folder that holds them (the 'geneformer/' folder of the Geneformer repository for "
        "V2, 'geneformer/gene_dictionaries_30m/' for V1)."
    )
    raise FileNotFoundError(msg)


def _read_config(file: Path) -> tuple[dict[str, Any], str]:
    raw = file.read_bytes()
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{file} is not valid JSON ({err}); expected a BERT configuration."
        raise ValueError(msg) from err


def resolve_geneformer_checkpoint(
    checkpoint: str | os.PathLike | GeneformerCheckpoint,
    *,
    dictionaries: str | os.PathLike | dict[str, Any] | GeneformerDictionaries | None = None,
    version: str | None = None,
) -> GeneformerCheckpoint:
    """Find and check a Geneformer checkpoint folder and its dictionaries.

    Parameters
    ----------
    checkpoint
        A folder holding ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
        (e.g. ``Geneformer/Geneformer-V2-104M``). A :class:`GeneformerCheckpoint` is returned as
        it is.
    dictionaries
        The dictionaries: a folder holding one set, ``{kind: path}`` (see
        :func:`~scdlkit.foundation.models.geneformer.load_geneformer_dictionaries`) or loaded
        :class:`GeneformerDictionaries`. ``None`` looks in the checkpoint folder, its
        ``dictionaries/`` sub-folder, a sibling ``dictionaries/`` folder, then ``geneformer/`` and
        ``geneformer/gene_dictionaries_30m/`` inside the folder and beside it (the Geneformer
        repository's layout), and takes the first set whose token dictionary has the model's
        ``vocab_size``.
    version
        ``"V1"`` or ``"V2"`` to state the model series; it must agree with the dictionaries
        (V2 has ``<cls>`` and ``<eos>``). ``None`` takes it from the dictionaries.

    Returns
    -------
    GeneformerCheckpoint
        The folder, configuration, weights path, dictionaries and version; weights not read.

    Raises
    ------
    FileNotFoundError
        When the folder, ``config.json``, a weights file or the dictionaries are missing.
    ValueError
        When ``config.json`` is not a supported BERT, the token dictionary's size differs from
        ``vocab_size``, a dictionary is refused, or ``version`` disagrees with the dictionaries.

    Examples
    --------
    >>> ckpt = resolve_geneformer_checkpoint("Geneformer/Geneformer-V2-104M")  # doctest: +SKIP
    >>> ckpt.version, ckpt.model_input_size  # doctest: +SKIP
    ('V2', 4096)
    """
    if isinstance(checkpoint, GeneformerCheckpoint):
        return checkpoint
    if version is not None and version not in VERSIONS:
        msg = f"version={version!r} is not a Geneformer model series; use 'V1', 'V2' or None."
        raise ValueError(msg)
    folder = Path(checkpoint).expanduser()
    if not folder.is_dir():
        msg = (
            f"Geneformer checkpoint folder {folder} does not exist. scdlkit never downloads "
            "weights: get a model folder (e.g. Geneformer-V2-104M) from "
            "https://huggingface.co/ctheodoris/Geneformer and pass its path."
        )
        raise FileNotFoundError(msg)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        msg = (
            f"{folder} has no {CONFIG_FILE}; a Geneformer checkpoint folder holds config.json "
            "and model.safetensors (or pytorch_model.bin), as released upstream."
        )
        raise FileNotFoundError(msg)
    raw, digest = _read_config(config_file)
    config = GeneformerConfig.from_dict(raw, source=config_file)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        msg = (
            f"{folder} has no weights file ({' or '.join(WEIGHT_FILES)}); copy it from the "
            "Geneformer release next to config.json (training_args.bin is not weights)."
        )
        raise FileNotFoundError(msg)
    if dictionaries is None:
        dicts = _find_dictionaries(folder, config.vocab_size)
    else:
        dicts = (
            dictionaries
            if isinstance(dictionaries, GeneformerDictionaries)
            else load_geneformer_dictionaries(dictionaries)
        )
        if dicts.n_tokens != config.vocab_size:
            msg = (
                f"{config_file} says vocab_size={config.vocab_size}, but the token dictionary "
                f"{dicts.files.get('token', '')} has {dicts.n_tokens} tokens: they belong to "
                "different models. Use the dictionaries released with this model (V2: "
                "*_gc104M.pkl, V1: *_gc30M.pkl)."
            )
            raise ValueError(msg)
    if dicts.pad_id != config.pad_token_id:
        msg = (
            f"{config_file} says pad_token_id={config.pad_token_id}, but the token dictionary "
            f"{dicts.files.get('token', '')} has <pad>={dicts.pad_id}; they do not belong together."
        )
        raise ValueError(msg)
    if version is not None and version != dicts.version:
        has = "has" if dicts.version == "V2" else "lacks"
        msg = (
            f"version={version!r}, but the token dictionary {dicts.files.get('token', '')} {has} "
            f"<cls> and <eos>, which makes it {dicts.version}; pass the {version} dictionaries "
            "or drop version=."
        )
        raise ValueError(msg)
    return GeneformerCheckpoint(
        path=folder.resolve(),
        name=folder.resolve().name,
        config=config,
        raw_config=raw,
        config_sha256=digest,
        weights_path=weights.resolve(),
        dictionaries=dicts,
        version=dicts.version,
    )
