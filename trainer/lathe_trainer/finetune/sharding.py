"""FSDP2 for a FineTune phase: the model sharded for training, and gathered whole after it.

With `spec.distributed.strategy: fsdp` and more than one process, each transformer layer and
then the whole model are sharded with `fully_shard`, frozen base weights included. A process
then keeps a share of the weights, gradients and optimizer state instead of all of them.
Checkpoints hold the same full (gathered) state as without sharding, so a phase may resume
on another number of processes or with the other strategy. Evaluation during training runs
the sharded model on every process. The phase's final model is gathered into an unsharded
copy, because merging LoRA weights and `save_pretrained` need whole tensors.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from lathe_trainer.finetune import checkpoint, distributed
from lathe_trainer.training import parallel

# Gathered on rank 0 and moved to its CPU, as a checkpoint stores them.
_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module, strategy: str) -> bool:
    """Shard `model` in place for `strategy` fsdp with several processes; return whether it did.

    Call it before building the optimizer, which must see the sharded parameters.
    """
    if strategy != "fsdp" or distributed.world_size() == 1:
        return False
    for layer in parallel.transformer_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the trainable parameters by name, whole and on the CPU.

    Collective under FSDP: every process must call it, and only rank 0 gets the values.
    """
    if not parallel.is_sharded(model):
        return checkpoint.trainable_state(model)
    trainable = {name for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    full = get_model_state_dict(model, options=_TO_RANK0)
    return {name: value for name, value in full.items() if name in trainable}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Return the optimizer state, whole. Collective under FSDP, where only rank 0 gets it,
    keyed by parameter names instead of positions."""
    if not parallel.is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_TO_RANK0)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            trainable: dict[str, torch.Tensor], saved_optimizer: dict[str, Any]) -> None:
    """Load a checkpoint's trainable parameters and optimizer state; every process passes the
    whole values. Either optimizer format, by position or by name, loads into either model."""
    if not parallel.is_sharded(model):
        checkpoint.restore_trainable(model, trainable)
        # A plain load matches saved parameters to the optimizer's by position, whatever
        # their keys.
        optimizer.load_state_dict(saved_optimizer)
        return
    checkpoint.check_trainable(model, trainable)
    full = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=full)
    set_optimizer_state_dict(
        model, optimizer, parallel.keyed_by_name(model, optimizer, saved_optimizer),
        options=StateDictOptions(full_state_dict=True),
    )


def unsharded(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Return `model` itself, or, when it is sharded, a copy that `build()` creates with the
    gathered weights. Collective under FSDP."""
    if not parallel.is_sharded(model):
        return model
    # Without cpu_offload every process receives the whole tensors.
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    whole = build()
    whole.load_state_dict(weights)
    return whole
