"""scanpy-style tools: validate the AnnData, run scGPT, write obs/obsm/uns."""

from scdlkit.tl._adapt_annotation import adapt_annotation
from scdlkit.tl._annotate import annotate
from scdlkit.tl._annotation_markers import annotation_markers
from scdlkit.tl._embed import embed
from scdlkit.tl._inspect import inspect
from scdlkit.tl._train_baseline import train_baseline

__all__ = [
    "adapt_annotation",
    "annotate",
    "annotation_markers",
    "embed",
    "inspect",
    "train_baseline",
]
