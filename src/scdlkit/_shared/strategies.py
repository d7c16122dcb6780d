"""The strategy names, in one place (torch-free: the CLI and the plots import it).

Each name's fitting lives in one family object of ``scdlkit.foundation``; here are only the names,
their order (also the plots' colour order) and the groups they fall into.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_STRATEGIES",
    "FEATURE_STRATEGIES",
    "NEURAL_STRATEGIES",
    "PEFT_STRATEGIES",
    "STRATEGIES",
    "TUNING_STRATEGIES",
]

#: Every strategy, in display order.
STRATEGIES = (
    "frozen_probe",
    "head",
    "full_finetune",
    "lora",
    "adapter",
    "prefix_tuning",
    "ia3",
    "baseline",
)
#: What ``adapt_annotation`` compares when ``strategies`` is not given: the cheap scGPT
#: strategies, always beside the plain baseline.
DEFAULT_STRATEGIES = ("frozen_probe", "head", "baseline")
#: Strategies trained by gradient descent through the Trainer.
NEURAL_STRATEGIES = ("head", "full_finetune", "lora", "adapter", "prefix_tuning", "ia3")
#: Strategies that tune the scGPT annotation model (its ``tuning_strategy`` values).
TUNING_STRATEGIES = NEURAL_STRATEGIES
#: Parameter-efficient methods that wrap encoder modules.
PEFT_STRATEGIES = ("lora", "adapter", "prefix_tuning", "ia3")
#: Strategies that read ``<cls>`` features of the frozen pretrained encoder.
FEATURE_STRATEGIES = ("frozen_probe", "head")
