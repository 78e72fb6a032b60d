"""Process-group helpers for the FineTune stage, which runs as one process or under torchrun.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE. With WORLD_SIZE above 1 the stage joins a
process group (gloo on CPU, nccl with GPUs). Where CUDA is available, each process trains on
the GPU of its LOCAL_RANK. Every helper here also works without a process
group, as the identity for a single process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def device() -> torch.device:
    """Return this process's device: the GPU of its LOCAL_RANK where CUDA is available."""
    # NOTE: the project's tests run on CPUs only, so the GPU placement has not run there.
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def setup(backend: str) -> None:
    """Select this process's GPU, if any, and join the process group that torchrun describes.

    A single process joins no group. NCCL and its object collectives use the current CUDA
    device, so each process selects its own GPU first.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    log.info(
        "Joined the %s process group as rank %d of %d.", backend, dist.get_rank(),
        dist.get_world_size(),
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place, and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    """Return every process's value, indexed by rank."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Return rank 0's value on every process."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_parameters(parameters: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values into every process, so all start from the same weights."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=0)
