"""Build the PretrainJob's model from a `transformers` config, with fresh weights.

Nothing is downloaded: the config comes from `spec.model` and the tokenizer's vocabulary, and
`AutoModelForCausalLM.from_config` initializes the weights from the seeded torch RNG.
"""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from lathe.api.pretrain import ModelArchitectureSpec
from lathe_trainer.pretrain.data import END_OF_TEXT

PAD = "<pad>"


def model_config(
    spec: ModelArchitectureSpec, tokenizer: PreTrainedTokenizerFast
) -> PretrainedConfig:
    """Return the transformers config for spec.model, sized to the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    # len(tokenizer) counts added special tokens too, so every id the tokenizer emits has a row.
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": vocab[END_OF_TEXT],
        "eos_token_id": vocab[END_OF_TEXT],
        "pad_token_id": vocab.get(PAD),
    }
    if spec.architecture == "llama":
        return LlamaConfig(
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            **special,
        )
    # NB: dropout is off for GPT-2 as it is in Llama's defaults: a single pass over a small
    # corpus underfits rather than overfits, and it keeps the two architectures comparable.
    return GPT2Config(
        n_embd=spec.hidden_size,
        n_layer=spec.num_layers,
        n_head=spec.num_heads,
        n_inner=spec.intermediate_size,
        n_positions=spec.max_position_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )


def build_model(config: PretrainedConfig) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(config)


def parameter_count(model: PreTrainedModel) -> int:
    # model.parameters() yields a tied embedding once, so it is counted once.
    return sum(parameter.numel() for parameter in model.parameters())
