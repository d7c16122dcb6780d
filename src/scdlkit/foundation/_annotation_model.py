"""scGPT encoder plus upstream's ``cls_decoder`` head, adapted by one tuning strategy.

Strategies trained through this model (``frozen_probe`` and ``baseline`` are logistic regressions
that live in the annotation runner and never build one):

======================  ====================================================================
``head``                encoder frozen and kept in eval mode; only the classifier head trains
                        (features can be precomputed once and passed as ``batch["features"]``)
``full_finetune``       every encoder weight and the head train (the published scGPT recipe)
``lora``                :class:`~scdlkit.foundation.LoRAConfig` updates + head
``adapter``             :class:`~scdlkit.foundation.AdapterConfig` bottlenecks + head
``prefix_tuning``       :class:`~scdlkit.foundation.PrefixTuningConfig` prefixes + head
``ia3``                 :class:`~scdlkit.foundation.IA3Config` rescaling vectors + head
======================  ====================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scdlkit._shared.strategies import TUNING_STRATEGIES
from scdlkit.foundation._device import resolve_device
from scdlkit.foundation._input_norm import (
    DEFAULT_INPUT_NORM,
    INPUT_NORMS,
    LEGACY_INPUT_NORM,
    BatchStandardiser,
    FeatureStandardiser,
    LayerNormInput,
    _check_input_norm,
    make_input_norm,
)
from scdlkit.foundation.models import load_encoder, model_card, resolve_model_checkpoint
from scdlkit.foundation.models._contract import FoundationEncoder, ModelCheckpoint
from scdlkit.foundation.peft import (
    PEFTConfig,
    apply_peft,
    freeze_except_peft,
    peft_parameter_names,
    resolve_strategy_config,
)

__all__ = [
    "DEFAULT_CLASSIFIER_DROPOUT",
    "DEFAULT_INPUT_NORM",
    "INPUT_NORMS",
    "LEGACY_INPUT_NORM",
    "TUNING_STRATEGIES",
    "BatchStandardiser",
    "ClsDecoder",
    "FeatureStandardiser",
    "LayerNormInput",
    "ScGPTAnnotationModel",
    "build_annotation_model",
    "load_scgpt_annotation_model",
    "make_input_norm",
]

#: Dropout on the ``<cls>`` vector before the head. 0.1, the usual rate before a transformer
#: classification head (BERT); upstream scGPT has none at this position (0.0 reproduces it). The
#: encoder's own dropout is a training setting (``encoder_dropout``: 0 by default, the
#: checkpoint's 0.2 under ``training="upstream"``).
DEFAULT_CLASSIFIER_DROPOUT = 0.1

_NOT_HERE = {
    "frozen_probe": (
        "tuning_strategy='frozen_probe' is logistic regression on frozen <cls> features; it "
        "builds no neural model and lives in the annotation runner (AnnotationRunner / "
        "adapt_annotation). For a trainable head on frozen features use tuning_strategy='head'."
    ),
    "baseline": (
        "tuning_strategy='baseline' is logistic regression on log-normalised expression without "
        "scGPT; it lives in the annotation runner (AnnotationRunner / adapt_annotation)."
    ),
}


def _check_strategy(tuning_strategy: Any) -> str:
    if isinstance(tuning_strategy, str) and tuning_strategy in _NOT_HERE:
        raise ValueError(_NOT_HERE[tuning_strategy])
    if not isinstance(tuning_strategy, str) or tuning_strategy not in TUNING_STRATEGIES:
        msg = (
            f"unknown tuning_strategy={tuning_strategy!r}; valid strategies for an scGPT "
            f"annotation model are {', '.join(map(repr, TUNING_STRATEGIES))} ('frozen_probe' and "
            "'baseline' run in the annotation runner)."
        )
        raise ValueError(msg)
    return tuning_strategy


def _check_num_classes(
    num_classes: Any, label_categories: Sequence[Any] | None
) -> list[str] | None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        msg = f"num_classes must be an integer >= 2, got {num_classes!r}."
        raise ValueError(msg)
    if label_categories is None:
        return None
    if isinstance(label_categories, str):
        msg = "label_categories must be a sequence of class names, not a single string."
        raise ValueError(msg)
    categories = [str(c) for c in label_categories]
    if len(categories) != num_classes:
        msg = (
            f"label_categories has {len(categories)} entries but num_classes={num_classes}; "
            "give one name per class, in class-code order."
        )
        raise ValueError(msg)
    if len(set(categories)) != len(categories):
        msg = f"label_categories holds duplicate names: {categories}."
        raise ValueError(msg)
    return categories


def _check_dropout(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        msg = f"classifier_dropout must be a number in [0, 1), got {value!r}."
        raise ValueError(msg)
    return float(value)


class ClsDecoder(nn.Module):
    """Upstream's ``ClsDecoder``: ``(n_layers_cls - 1) x [Linear(d, d), ReLU, LayerNorm(d)]``,
    then ``out_layer = Linear(d, n_classes)``.

    State-dict names match upstream (``_decoder.0``, ``_decoder.2``, ``_decoder.3``, ...,
    ``out_layer``), so a head fine-tuned with upstream scGPT loads as it is.

    Parameters
    ----------
    d_model
        Width of the ``<cls>`` vector.
    n_classes
        Number of classes.
    n_layers_cls
        Hidden blocks plus one (``args.json``'s ``n_layers_cls``, 3 in the official checkpoints).

    Examples
    --------
    >>> from scdlkit.foundation._annotation_model import ClsDecoder
    >>> ClsDecoder(32, 5)(torch.zeros(2, 32)).shape
    torch.Size([2, 5])
    """

    def __init__(self, d_model: int, n_classes: int, n_layers_cls: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(n_layers_cls - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.ReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ScGPTAnnotationModel(nn.Module):
    """scGPT encoder and a classifier head on its ``<cls>`` output, adapted by one strategy.

    Construction applies the strategy to ``encoder`` in place and freezes everything but the
    strategy's own parameters and the head (``full_finetune`` trains everything). Use
    :func:`build_annotation_model` or :func:`load_scgpt_annotation_model` to get one from
    pretrained weights; the constructor is the cheap path (e.g. an encoder built on the
    ``"meta"`` device to count parameters at full size).

    Parameters
    ----------
    encoder
        The scGPT encoder, pretrained weights loaded. It is modified in place.
    num_classes
        Number of classes (>= 2).
    tuning_strategy
        ``"head"``, ``"full_finetune"``, ``"lora"``, ``"adapter"``, ``"prefix_tuning"`` or
        ``"ia3"``.
    strategy_config
        The strategy's config (:class:`~scdlkit.foundation.LoRAConfig`, ...), a dict of its
        fields, or ``None`` for its defaults. ``head`` and ``full_finetune`` take none.
    label_categories
        Class names in class-code order (length ``num_classes``), kept for predictions.
    classifier_dropout
        Dropout on the ``<cls>`` vector before the head; default
        :data:`DEFAULT_CLASSIFIER_DROPOUT` (0.1).
    n_layers_cls
        Depth of the head; ``None`` takes the encoder's ``head_layers`` (scGPT: its
        ``n_layers_cls``, 3 upstream).
    input_norm
        Normalisation of the ``<cls>`` vector before dropout and head (:data:`INPUT_NORMS`):
        ``"frozen"`` (default) a fixed per-dimension standardisation that
        ``feature_norm.fit(features)`` sets from the frozen encoder's features (identity until
        then); ``"layernorm"`` a learned LayerNorm trained with the head; ``"batch"``
        per-dimension batch statistics with running estimates, which follow the encoder as it
        trains (``fit`` only initialises the estimates). Upstream scGPT has none.

    Attributes
    ----------
    encoder
        The (adapted) foundation-model encoder (see :mod:`scdlkit.foundation.models`).
    feature_norm
        The classifier-input normalisation (see ``input_norm``).
    cls_decoder
        The classifier head (upstream's names and structure).
    tuning_strategy, strategy_config, label_categories, num_classes, classifier_dropout, input_norm
        As given (the config validated, ``None`` for ``head``/``full_finetune``).

    Examples
    --------
    >>> model = ScGPTAnnotationModel(encoder, 5, tuning_strategy="lora")  # doctest: +SKIP
    >>> out = model({"gene_ids": ids, "values": values, "padding_mask": mask})  # doctest: +SKIP
    >>> out["logits"].shape, out["latent"].shape  # doctest: +SKIP
    """

    def __init__(
        self,
        encoder: FoundationEncoder,
        num_classes: int,
        *,
        tuning_strategy: str = "head",
        strategy_config: PEFTConfig | dict[str, Any] | None = None,
        label_categories: Sequence[Any] | None = None,
        classifier_dropout: float = DEFAULT_CLASSIFIER_DROPOUT,
        n_layers_cls: int | None = None,
        input_norm: str = DEFAULT_INPUT_NORM,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, FoundationEncoder):
            msg = f"encoder must be a foundation-model encoder, got {type(encoder).__name__}."
            raise TypeError(msg)
        self.tuning_strategy = _check_strategy(tuning_strategy)
        self.label_categories = _check_num_classes(num_classes, label_categories)
        self.num_classes = num_classes
        self.strategy_config = resolve_strategy_config(tuning_strategy, strategy_config)
        self.classifier_dropout = _check_dropout(classifier_dropout)
        self.input_norm = _check_input_norm(input_norm)
        n_layers_cls = encoder.head_layers if n_layers_cls is None else n_layers_cls
        if isinstance(n_layers_cls, bool) or not isinstance(n_layers_cls, int) or n_layers_cls < 1:
            msg = f"n_layers_cls must be an integer >= 1, got {n_layers_cls!r}."
            raise ValueError(msg)
        self.n_layers_cls = n_layers_cls

        self.encoder = encoder
        # the head is drawn first, so one seed gives every strategy the same initial head
        weight = next(encoder.parameters())
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.feature_norm = make_input_norm(self.input_norm, encoder.d_model).to(
            device=weight.device
        )
        self.cls_decoder = ClsDecoder(encoder.d_model, num_classes, n_layers_cls).to(
            device=weight.device, dtype=weight.dtype
        )
        if self.strategy_config is not None:
            apply_peft(encoder, self.strategy_config)
        if tuning_strategy == "full_finetune":
            encoder.requires_grad_(True)
        elif tuning_strategy == "head":
            encoder.requires_grad_(False)
        else:
            freeze_except_peft(encoder)
        self.train(encoder.training)

    # ------------------------------------------------------------------ modes and forward

    def train(self, mode: bool = True) -> ScGPTAnnotationModel:
        """Set train/eval mode; under ``head`` the frozen encoder always stays in eval mode.

        Parameters
        ----------
        mode
            ``True`` for training mode.

        Returns
        -------
        The model.

        Examples
        --------
        >>> model.train().encoder.training  # False under tuning_strategy="head"  # doctest: +SKIP
        """
        super().train(mode)
        if self.tuning_strategy == "head":
            self.encoder.eval()
        return self

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The encoder's ``<cls>`` output ``(batch, d_model)`` (no gradient under ``head``).

        Parameters
        ----------
        batch
            ``gene_ids``, ``values`` and optionally ``padding_mask``, as the model's token store
            collates them (``TokenStore.collate`` in :mod:`scdlkit.foundation.models`).

        Returns
        -------
        The ``<cls>`` vectors; under ``head`` these are the features to precompute once.

        Examples
        --------
        >>> features = model.encode(batch)  # doctest: +SKIP
        """
        grad = torch.is_grad_enabled() and self.tuning_strategy != "head"
        with torch.set_grad_enabled(grad):
            return self.encoder.cls_embedding(
                batch["gene_ids"], batch["values"], batch.get("padding_mask")
            )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class logits and the ``<cls>`` latent of a batch.

        Parameters
        ----------
        batch
            Either token input (``gene_ids``, ``values``, optional ``padding_mask``) or
            ``features``: precomputed ``<cls>`` outputs ``(batch, d_model)``, in which case only
            the head runs (the frozen ``head`` strategy computes features once). Other keys
            (e.g. ``labels``) are ignored.

        Returns
        -------
        dict
            ``{"logits": (batch, num_classes), "latent": (batch, d_model)}``; ``latent`` is the
            ``<cls>`` output before dropout.

        Examples
        --------
        >>> model(batch)["logits"].argmax(-1)  # doctest: +SKIP
        """
        latent = batch["features"] if "features" in batch else self.encode(batch)
        logits = self.cls_decoder(self.dropout(self.feature_norm(latent)))
        return {"logits": logits, "latent": latent}

    # ------------------------------------------------------------------ parameters and state

    def head_parameters(self) -> list[nn.Parameter]:
        """The classifier head's parameters, new for every label set (the Trainer's ``head_lr``).

        Returns
        -------
        The parameters of ``cls_decoder`` and, with ``input_norm="layernorm"``, of the
        LayerNorm before it (trained with the head).
        """
        return [*self.feature_norm.parameters(), *self.cls_decoder.parameters()]

    def trainable_parameter_count(self) -> int:
        """Number of parameter elements that require gradients (the strategy's and the head's).

        Returns
        -------
        The count.

        Examples
        --------
        >>> model.trainable_parameter_count()  # doctest: +SKIP
        """
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _adaptation_keys(self) -> list[str]:
        state_keys = list(self.state_dict().keys())
        head = [k for k in state_keys if k.startswith(("cls_decoder.", "feature_norm."))]
        if self.tuning_strategy == "full_finetune":
            return state_keys
        if self.tuning_strategy == "head":
            return head
        peft = [f"encoder.{n}" for n in peft_parameter_names(self.encoder)]
        if not peft:
            msg = (
                f"this {self.tuning_strategy!r} model holds no adaptation parameters (were LoRA "
                "updates merged into the weights with merge_lora?); save model.state_dict() "
                "instead."
            )
            raise ValueError(msg)
        return head + peft

    def adaptation_state_dict(self) -> dict[str, torch.Tensor]:
        """What the pretrained checkpoint does not hold: the head and the strategy's parameters.

        ``full_finetune`` changes every encoder weight, so its adaptation state is the full
        state dict. Tensors are detached references, as in ``state_dict()``.

        Returns
        -------
        dict
            ``{name: tensor}`` with names as in ``state_dict()``.

        Examples
        --------
        >>> state = model.adaptation_state_dict()  # doctest: +SKIP
        >>> fresh.load_adaptation_state_dict(state)  # doctest: +SKIP
        """
        state = self.state_dict()
        return {k: state[k] for k in self._adaptation_keys()}

    def load_adaptation_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adaptation_state_dict` returned into a model of the same build.

        Parameters
        ----------
        state
            ``{name: tensor}``; must hold exactly this model's adaptation keys with the same
            shapes.

        Raises
        ------
        ValueError
            Naming missing or unexpected keys, or a shape mismatch.

        Examples
        --------
        >>> fresh.load_adaptation_state_dict(model.adaptation_state_dict())  # doctest: +SKIP
        """
        expected = self._adaptation_keys()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in set(expected)]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(
                    f"unexpected keys {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else "")
                )
            msg = (
                f"adaptation state does not fit this {self.tuning_strategy!r} model: "
                + "; ".join(parts)
                + ". Was it saved from a model with the same tuning_strategy and strategy_config?"
            )
            raise ValueError(msg)
        own = self.state_dict()
        for key in expected:
            if tuple(state[key].shape) != tuple(own[key].shape):
                msg = (
                    f"adaptation weight {key!r} has shape {tuple(state[key].shape)}, the model "
                    f"expects {tuple(own[key].shape)}."
                )
                raise ValueError(msg)
        self.load_state_dict(dict(state), strict=False)

    def config_dict(self) -> dict[str, Any]:
        """JSON-ready keyword arguments of :func:`build_annotation_model` that rebuild this model.

        Returns
        -------
        dict
            ``num_classes``, ``tuning_strategy``, ``strategy_config`` (a dict or ``None``),
            ``label_categories``, ``classifier_dropout`` and, unless it is ``"frozen"``,
            ``input_norm``. A config without ``input_norm`` means ``"frozen"``: every model
            saved before the option existed was fitted with it, and its manifest still reads
            the same.

        Examples
        --------
        >>> build_annotation_model(state, ckpt, **model.config_dict())  # doctest: +SKIP
        """
        config = {
            "num_classes": self.num_classes,
            "tuning_strategy": self.tuning_strategy,
            "strategy_config": None
            if self.strategy_config is None
            else self.strategy_config.to_dict(),
            "label_categories": None
            if self.label_categories is None
            else list(self.label_categories),
            "classifier_dropout": self.classifier_dropout,
        }
        if self.input_norm != LEGACY_INPUT_NORM:
            config["input_norm"] = self.input_norm
        return config

    def extra_repr(self) -> str:
        return (
            f"tuning_strategy={self.tuning_strategy!r}, num_classes={self.num_classes}, "
            f"input_norm={self.input_norm!r}"
        )


def _assemble(encoder: FoundationEncoder, seed: int, **kwargs: Any) -> ScGPTAnnotationModel:
    """Build the model with the new parameters drawn from ``seed``, leaving global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScGPTAnnotationModel(encoder, **kwargs)


def _precheck(
    tuning_strategy: str,
    strategy_config: Any,
    num_classes: Any,
    labels: Any,
    input_norm: Any = DEFAULT_INPUT_NORM,
) -> None:
    """Fail on bad arguments before any weight is read."""
    _check_input_norm(input_norm)
    _check_strategy(tuning_strategy)
    _check_num_classes(num_classes, labels)
    resolve_strategy_config(tuning_strategy, strategy_config)


def build_annotation_model(
    encoder_state: dict[str, torch.Tensor],
    checkpoint: ModelCheckpoint | str | os.PathLike,
    *,
    num_classes: int,
    tuning_strategy: str = "head",
    strategy_config: PEFTConfig | dict[str, Any] | None = None,
    label_categories: Sequence[Any] | None = None,
    classifier_dropout: float = DEFAULT_CLASSIFIER_DROPOUT,
    input_norm: str = LEGACY_INPUT_NORM,
    seed: int = 0,
) -> ScGPTAnnotationModel:
    """Build an annotation model from encoder weights already in memory.

    The runner reads the checkpoint once and builds every strategy from the same weights; each
    model gets its own copy of the tensors, so strategies never share storage.

    Parameters
    ----------
    encoder_state
        The checkpoint's state dict (its model card's ``read_weights``, or an encoder's
        ``state_dict()``); every encoder key must be present, others are ignored.
    checkpoint
        The resolved checkpoint (architecture and vocabulary), or anything
        :func:`~scdlkit.foundation.resolve_checkpoint` takes.
    num_classes, tuning_strategy, strategy_config, label_categories, classifier_dropout
        See :class:`ScGPTAnnotationModel`.
    input_norm
        ``"frozen"``, ``"layernorm"`` or ``"batch"``; see :class:`ScGPTAnnotationModel`. The
        default is :data:`LEGACY_INPUT_NORM` (``"frozen"``), what a saved config without this key
        was fitted with, so ``build_annotation_model(..., **model.config_dict())`` always rebuilds
        the model saved; it stays so if :data:`DEFAULT_INPUT_NORM` changes (a new model's caller
        passes ``input_norm`` explicitly).
    seed
        Seeds the new parameters (head, LoRA ``A``, prefixes); the global RNG is left as it was.

    Returns
    -------
    The model on CPU, in eval mode.

    Examples
    --------
    >>> from scdlkit.foundation import model_card
    >>> ckpt = resolve_checkpoint("path/to/scGPT_human")  # doctest: +SKIP
    >>> state = model_card(ckpt).read_weights(ckpt)  # doctest: +SKIP
    >>> model = build_annotation_model(
    ...     state, ckpt, num_classes=8, tuning_strategy="lora"
    ... )  # doctest: +SKIP
    """
    _precheck(tuning_strategy, strategy_config, num_classes, label_categories, input_norm)
    ckpt = resolve_model_checkpoint(checkpoint)
    card = model_card(ckpt)
    with torch.random.fork_rng(devices=[]):
        encoder = card.build(ckpt)
    encoder.load_report = card.load_weights(encoder, encoder_state)
    encoder.checkpoint = ckpt
    model = _assemble(
        encoder,
        seed,
        num_classes=num_classes,
        tuning_strategy=tuning_strategy,
        strategy_config=strategy_config,
        label_categories=label_categories,
        classifier_dropout=classifier_dropout,
        input_norm=input_norm,
    )
    return model.eval()


def load_scgpt_annotation_model(
    num_classes: int,
    label_categories: Sequence[Any] | None = None,
    checkpoint: str | os.PathLike | ModelCheckpoint = "whole-human",
    tuning_strategy: str = "head",
    strategy_config: PEFTConfig | dict[str, Any] | None = None,
    *,
    classifier_dropout: float = DEFAULT_CLASSIFIER_DROPOUT,
    input_norm: str = DEFAULT_INPUT_NORM,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> ScGPTAnnotationModel:
    """Load a pretrained scGPT checkpoint and set it up for cell-type annotation.

    Parameters
    ----------
    num_classes
        Number of cell types (>= 2).
    label_categories
        Class names in class-code order (length ``num_classes``).
    checkpoint
        Official name looked up in the local cache, or a folder holding ``args.json``,
        ``vocab.json`` and ``best_model.pt``.
    tuning_strategy
        ``"head"`` (default), ``"full_finetune"``, ``"lora"``, ``"adapter"``,
        ``"prefix_tuning"`` or ``"ia3"``. ``"frozen_probe"`` and ``"baseline"`` are logistic
        regressions run by the annotation runner and are refused here.
    strategy_config
        Config of the strategy (e.g. :class:`~scdlkit.foundation.LoRAConfig`), a dict of its
        fields, or ``None`` for its defaults.
    classifier_dropout
        Dropout on the ``<cls>`` vector before the head (default 0.1).
    input_norm
        Normalisation of the ``<cls>`` vector before the head: ``"frozen"`` (default; fit it
        with ``model.feature_norm.fit(features)``), ``"layernorm"`` or ``"batch"``; see
        :class:`ScGPTAnnotationModel`.
    device
        ``"auto"`` (CUDA, then MPS, then CPU) or any torch device.
    seed
        Seeds the new parameters; the global RNG is left as it was.

    Returns
    -------
    The :class:`ScGPTAnnotationModel`, in eval mode; ``model.encoder.load_report`` says which
    checkpoint keys were used.

    Raises
    ------
    ValueError
        For an unknown or runner-only strategy, a config of the wrong type, bad config values,
        an unknown ``input_norm`` or ``label_categories`` of the wrong length (all before the
        weights are read).

    Examples
    --------
    >>> from scdlkit.foundation import LoRAConfig
    >>> model = load_scgpt_annotation_model(  # doctest: +SKIP
    ...     8, tuning_strategy="lora", strategy_config=LoRAConfig(rank=8)
    ... )
    >>> model.trainable_parameter_count()  # doctest: +SKIP
    """
    _precheck(tuning_strategy, strategy_config, num_classes, label_categories, input_norm)
    encoder = load_encoder(checkpoint, device="cpu")
    model = _assemble(
        encoder,
        seed,
        num_classes=num_classes,
        tuning_strategy=tuning_strategy,
        strategy_config=strategy_config,
        label_categories=label_categories,
        classifier_dropout=classifier_dropout,
        input_norm=input_norm,
    )
    return model.to(resolve_device(device)).eval()
