"""The strategy table, in one place (torch-free: the CLI and the plots import it).

Each line names a strategy and the kind of thing that fits it, which is where its code lives:

- ``"peft"``: the neural family with the adaptation method of
  ``scdlkit/foundation/peft/<name>.py`` (imported by name; the file registers the method);
- any other kind: the strategy family of ``scdlkit/foundation/strategies/<kind>.py``.

A new PEFT method or a new family is therefore one file plus one line here. The order is the
display order (and the plots' colour order); the groups below follow from the table.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_STRATEGIES",
    "FEATURE_STRATEGIES",
    "NEURAL_STRATEGIES",
    "PEFT_STRATEGIES",
    "STRATEGIES",
    "STRATEGY_KINDS",
    "TUNING_STRATEGIES",
]

#: Every strategy, in display order -> what fits it (see the module docstring).
STRATEGY_KINDS: dict[str, str] = {
    "frozen_probe": "frozen_probe",
    "head": "neural",
    "full_finetune": "neural",
    "lora": "peft",
    "adapter": "peft",
    "prefix_tuning": "peft",
    "ia3": "peft",
    "baseline": "expression_baseline",
}
#: Every strategy, in display order.
STRATEGIES = tuple(STRATEGY_KINDS)
#: What ``adapt_annotation`` compares when ``strategies`` is not given: the cheap scGPT
#: strategies, always beside the plain baseline.
DEFAULT_STRATEGIES = ("frozen_probe", "head", "baseline")
#: Parameter-efficient methods that wrap encoder modules.
PEFT_STRATEGIES = tuple(name for name, kind in STRATEGY_KINDS.items() if kind == "peft")
#: Strategies trained by gradient descent through the Trainer.
NEURAL_STRATEGIES = tuple(
    name for name, kind in STRATEGY_KINDS.items() if kind in ("neural", "peft")
)
#: Strategies that tune the scGPT annotation model (its ``tuning_strategy`` values).
TUNING_STRATEGIES = NEURAL_STRATEGIES
#: Strategies that read ``<cls>`` features of the frozen pretrained encoder.
FEATURE_STRATEGIES = ("frozen_probe", "head")
