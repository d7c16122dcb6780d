"""Joining a ``torchrun`` (or SLURM) process group for ``embed`` and ``annotate``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["torchrun_group"]

logger = logging.getLogger("scdlkit")


@contextlib.contextmanager
def torchrun_group(device: str) -> Iterator[bool]:
    """Join the process group of a ``torchrun``/SLURM launch; yield whether to write outputs.

    Outside such a launch (``WORLD_SIZE`` unset or 1), or when the caller already set up a
    group, nothing is done and every process writes. Otherwise the group is joined (NCCL on
    CUDA, gloo elsewhere), each process takes the GPU of its ``LOCAL_RANK``, and only rank 0
    writes; the tools shard the cells across the group and gather the results in cell order.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield True
        return
    # here: only a distributed launch needs them, and 'scdlkit --help' must not import torch
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_rank() == 0
        return
    cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        logger.info("process %d of %d", dist.get_rank(), dist.get_world_size())
        yield dist.get_rank() == 0
        dist.barrier()
    finally:
        dist.destroy_process_group()
