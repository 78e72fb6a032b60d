"""Data-parallel wrapping (DDP or FSDP2) and the full state dicts that checkpoints store.

The same code runs as one process, as several local processes and across nodes: with a world
of one the model stays unwrapped. FSDP uses FSDP2 (`torch.distributed.fsdp.fully_shard`),
sharding each transformer layer and then the root module; it runs on gloo (CPU) as well as
nccl in torch 2.13. Checkpoints always hold full (gathered) state dicts: a plain
`model.state_dict()` for DDP and one process, and the parameter-name keyed full state dicts of
`torch.distributed.checkpoint.state_dict` for FSDP. The two optimizer formats differ, and
`load_full_state_dicts` loads either into either kind of model, so a run may continue on
another number of processes or nodes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lathe_trainer.training.distributed import DistributedContext

STRATEGIES = ("ddp", "fsdp")


def wrap(
    model: torch.nn.Module, context: DistributedContext, strategy: str, compile: bool = False
) -> torch.nn.Module:
    """Return the module that the training step calls.

    FSDP shards `model` in place, so call this before building the optimizer. DDP returns a
    wrapper around `model` that the optimizer may be built before or after. With `compile`,
    `nn.Module.compile()` compiles `model` in place, which keeps its state-dict keys (a
    `torch.compile(model)` wrapper would prefix them with `_orig_mod.` and break resume).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if compile:
        # NOTE: tested with DDP and a single process on CPU; compile with FSDP is untested.
        model.compile()
    if not context.is_distributed:
        return model
    if strategy == "fsdp":
        for layer in transformer_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    device_ids = [context.device] if context.device.type == "cuda" else None
    # gradient_as_bucket_view makes the gradients views of the all-reduce buckets, which
    # saves copying every gradient into them.
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the repeated blocks to shard one by one (Llama `layers`, GPT-2 `h`, T5 `block`).

    Only the outermost lists count: a T5 block holds its sublayers in a list named `layer`,
    and sharding a block after one of its sublayers fails, because the sublayer's parameters
    are already sharded.
    """
    layers: list[torch.nn.Module] = []
    selected: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        if name.rsplit(".", 1)[-1] not in ("layers", "h", "layer", "block"):
            continue
        if any(name.startswith(f"{outer}.") for outer in selected):
            continue
        selected.append(name)
        layers.extend(module)
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of a micro-batch that is not the last of its step."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` and return the total norm over all shards (a 0-d tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the gathered model and optimizer state dicts, on the CPU of rank 0.

    Collective under FSDP: every rank must call it. Ranks other than 0 get empty dicts then.
    """
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return model.state_dict(), optimizer.state_dict()


def full_model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """Return the gathered model state dict (collective under FSDP, empty off rank 0)."""
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return model.state_dict()


def load_full_state_dicts(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load state dicts written by `full_state_dicts`; every rank passes the full dicts.

    Either optimizer format loads into either kind of model, because an FSDP run of one
    process leaves the model unwrapped and so writes the plain format. A plain
    `Optimizer.load_state_dict` matches the saved parameters to its own by position, whatever
    their keys, and a sharded model gets the plain format renamed by `keyed_by_name`.
    """
    if is_sharded(model):
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=keyed_by_name(model, optimizer, optimizer_state),
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


def keyed_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any]
) -> dict[str, Any]:
    """Return a plain `Optimizer.state_dict()` keyed by parameter names, as `get_state_dict`
    keys it. A state already keyed by names is returned unchanged.

    The plain format numbers the parameters in the order of the optimizer's parameter groups.
    Each number is renamed after the parameter at that position now, which is also how
    `Optimizer.load_state_dict` matches them.
    """
    groups = optimizer_state["param_groups"]
    saved = [key for group in groups for key in group["params"]]
    if not all(isinstance(key, int) for key in saved):
        return optimizer_state
    current = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if len(saved) != len(current):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} parameters but "
                         f"the optimizer has {len(current)}, so the model does not match the "
                         "checkpoint.")
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    name_of = {key: names[id(parameter)] for key, parameter in zip(saved, current)}
    return {
        "state": {name_of[key]: value for key, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [name_of[key] for key in group["params"]]}
                         for group in groups],
    }


def all_finite(model: torch.nn.Module) -> bool:
    """Return whether every parameter on this rank is finite (each rank checks its shards)."""
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        if not bool(torch.isfinite(local).all()):
            return False
    return True
