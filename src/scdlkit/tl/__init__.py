"""scanpy-style tools: validate the AnnData, run scGPT, write obs/obsm/uns."""

from scdlkit.tl._embed import embed
from scdlkit.tl._inspect import inspect

__all__ = ["embed", "inspect"]
