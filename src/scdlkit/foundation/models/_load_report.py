"""What loading a checkpoint did with each key of its weights file (every model's loader)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CheckpointLoadReport"]


@dataclass
class CheckpointLoadReport:
    """What happened to each key of a checkpoint's weights file.

    Upstream loaders keep keys whose name and shape match and drop the rest silently; here the
    encoder must be complete and well-shaped, and what was ignored or renamed is reported.

    Attributes
    ----------
    used
        Keys loaded into the encoder.
    ignored
        Keys present in the file that the encoder does not use (pretraining heads such as
        scGPT's ``decoder.*`` or Geneformer's ``cls.predictions.*``, a pooler, a classifier).
    renamed
        ``{key in file: key in model}`` for keys stored under another name (scGPT's other
        attention layouts, Geneformer's ``LayerNorm.gamma``).
    """

    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{len(self.used)} keys used, {len(self.ignored)} ignored"
            + (f" ({', '.join(sorted(self.ignored))})" if self.ignored else "")
            + (f", {len(self.renamed)} keys renamed" if self.renamed else "")
        )
