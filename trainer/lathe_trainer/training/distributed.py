"""Process-group setup for training stages, from the environment that `torchrun` sets.

Under `torchrun` every process gets RANK, WORLD_SIZE and LOCAL_RANK. A plain `python -m
lathe_trainer ...` has none of them and runs as a world of one without a process group, so the
same stage code serves both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# NB: long enough for rank 0 to write a checkpoint or the final model while the other ranks
# wait at the next collective, short enough that a lost peer fails the attempt within minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class DistributedContext:
    """The calling process's place in the training world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_backend(requested: str, device: torch.device) -> str:
    """Resolve the `auto` backend: nccl on CUDA devices, gloo on CPUs."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def setup(requested_backend: str = "auto") -> DistributedContext:
    """Join the process group that torchrun describes, or return a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistributedContext(0, 1, 0, device, None)
    backend = pick_backend(requested_backend, device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    log.info(
        "Rank %d of %d joined the %s process group on %s.", rank, world_size, backend, device
    )
    return DistributedContext(rank, world_size, local_rank, device, backend)


def teardown(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def wait_for_all(context: DistributedContext, timeout: timedelta) -> None:
    """Wait until every rank reaches this call, for up to `timeout` instead of
    COLLECTIVE_TIMEOUT, as after work whose length differs between nodes.

    A gloo group of its own, with `timeout` as its timeout, carries the wait, because the
    collectives of the default group give up after COLLECTIVE_TIMEOUT.
    """
    if not context.is_distributed:
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def all_reduce_sum(context: DistributedContext, values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks (in float64, so token counts stay exact)."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(context: DistributedContext, value: object) -> list[object]:
    """Return every rank's `value`, in rank order."""
    if not context.is_distributed:
        return [value]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_max(context: DistributedContext, values: list[float]) -> list[float]:
    """Return the maximum of a few scalars over all ranks."""
    if not context.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
