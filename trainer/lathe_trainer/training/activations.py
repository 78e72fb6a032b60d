"""Activation (gradient) checkpointing of a Hugging Face model, shared by the training stages."""

from __future__ import annotations

from transformers import PreTrainedModel

# Non-reentrant checkpointing works under DDP, FSDP2 and torch.compile, and needs no input that
# requires a gradient, so it also works when LoRA freezes the embeddings. torch deprecates the
# reentrant variant.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each transformer layer's activations in the backward pass.

    Call it before DDP, FSDP or torch.compile wraps the model, and before peft adds adapters.
    """
    # transformers 5.25 deprecates gradient_checkpointing_enable for the new name. The old
    # name serves any earlier 5.x release that lacks the new one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
