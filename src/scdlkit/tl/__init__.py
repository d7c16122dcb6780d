"""scanpy-style tools: validate the AnnData, run scGPT, write obs/obsm/uns."""

from scdlkit.tl._embed import embed

__all__ = ["embed"]
