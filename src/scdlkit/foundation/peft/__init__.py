"""Parameter-efficient adaptation of a foundation-model encoder, one file per method.

Each method is a validated configuration, its layer module(s) and a function that changes an
encoder in place (and returns it), attaching where the encoder's
:class:`~scdlkit.foundation.models.AdaptationTargets` table says, registered under its
strategy name with :func:`register_peft_method` (as peft's ``tuners/<method>/``):

- :mod:`~scdlkit.foundation.peft.lora`: LoRA (Hu et al. 2021), a low-rank update
  ``B @ A * alpha / rank`` added to chosen projections.
- :mod:`~scdlkit.foundation.peft.adapter`: bottleneck adapters (Houlsby et al. 2019), akin to
  scPEFT's "encoder adapter" (He et al. 2025; placement and initialisation differ).
- :mod:`~scdlkit.foundation.peft.prefix_tuning`: prefix tuning (Li & Liang 2021), learned keys
  and values joined in front of each layer's own.
- :mod:`~scdlkit.foundation.peft.ia3`: IA3 (Liu et al. 2022), learned vectors rescaling keys,
  values and feed-forward activations.

What they share (the config base, validation, the wrapper base that keeps pretrained weights
under their state-dict names, freezing) is in ``_base``; the registry in ``_registry``. Importing
this package imports the file of every ``"peft"`` line of
:data:`scdlkit._shared.strategies.STRATEGY_KINDS` (``<name>.py``), which fills
:data:`PEFT_METHODS`: a new method is its file plus that one line.
"""

from importlib import import_module

from scdlkit._shared.strategies import PEFT_STRATEGIES
from scdlkit.foundation.peft._base import PEFTConfig, freeze_except_peft, peft_parameter_names
from scdlkit.foundation.peft._registry import (
    PEFT_METHODS,
    PEFTMethod,
    apply_peft,
    register_peft_method,
    resolve_strategy_config,
)
from scdlkit.foundation.peft.adapter import (
    AdapterConfig,
    AdapterLayerNorm,
    AdapterLinear,
    BottleneckAdapter,
    apply_adapter,
)
from scdlkit.foundation.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from scdlkit.foundation.peft.lora import (
    LoRAConfig,
    LoRALinear,
    ScGPTLoRAConfig,
    apply_lora,
    merge_lora,
)
from scdlkit.foundation.peft.prefix_tuning import (
    AttentionPrefix,
    PrefixTuningConfig,
    apply_prefix_tuning,
)

for _name in PEFT_STRATEGIES:  # the re-exported methods above are imported already
    import_module(f"{__name__}.{_name}")

__all__ = [
    "PEFT_METHODS",
    "AdapterConfig",
    "AdapterLayerNorm",
    "AdapterLinear",
    "AttentionPrefix",
    "BottleneckAdapter",
    "IA3Config",
    "IA3Linear",
    "LoRAConfig",
    "LoRALinear",
    "PEFTConfig",
    "PEFTMethod",
    "PrefixTuningConfig",
    "ScGPTLoRAConfig",
    "apply_adapter",
    "apply_ia3",
    "apply_lora",
    "apply_peft",
    "apply_prefix_tuning",
    "freeze_except_peft",
    "merge_lora",
    "peft_parameter_names",
    "register_peft_method",
    "resolve_strategy_config",
]
