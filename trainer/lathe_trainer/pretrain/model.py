"""Build the PretrainJob's model from a `transformers` config, with fresh weights.

Nothing is downloaded: the config comes from `spec.model` (a size preset with explicit fields
over it) and the tokenizer's vocabulary, and `from_config` initializes the weights from the
seeded torch RNG. llama and gpt2 build causal LMs, bert a masked LM and t5 an
encoder-decoder (the `Auto*` class follows the config's model type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)
from transformers.models.t5.modeling_t5 import T5LayerCrossAttention

from lathe.api.pretrain import ModelArchitectureSpec, ModelDimensions
from lathe_trainer.pretrain.data import END_OF_TEXT
from lathe_trainer.pretrain.objectives import T5_SENTINELS, span_corruption_lengths
from lathe_trainer.training import flops

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
    return architecture_config(spec, special)


def architecture_config(spec: ModelArchitectureSpec, special: dict) -> PretrainedConfig:
    """Return the transformers config for spec.model with the vocabulary size and token ids
    in `special` (vocab_size, bos_token_id, eos_token_id and pad_token_id)."""
    builders = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "t5": _t5}
    return builders[spec.architecture](spec.dimensions(), special)


def _llama(dimensions: ModelDimensions, special: dict) -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=dimensions.hidden_size,
        num_hidden_layers=dimensions.num_layers,
        num_attention_heads=dimensions.num_heads,
        num_key_value_heads=dimensions.num_heads,
        intermediate_size=dimensions.intermediate_size,
        max_position_embeddings=dimensions.max_position_embeddings,
        **special,
    )


# NB: dropout is off for GPT-2, BERT and T5 as it is in Llama's defaults: a single pass over a
# small corpus underfits rather than overfits, and it keeps the architectures comparable.
def _gpt2(dimensions: ModelDimensions, special: dict) -> PretrainedConfig:
    return GPT2Config(
        n_embd=dimensions.hidden_size,
        n_layer=dimensions.num_layers,
        n_head=dimensions.num_heads,
        n_inner=dimensions.intermediate_size,
        n_positions=dimensions.max_position_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
    )


def _bert(dimensions: ModelDimensions, special: dict) -> PretrainedConfig:
    return BertConfig(
        hidden_size=dimensions.hidden_size,
        num_hidden_layers=dimensions.num_layers,
        num_attention_heads=dimensions.num_heads,
        intermediate_size=dimensions.intermediate_size,
        max_position_embeddings=dimensions.max_position_embeddings,
        # Packed sequences carry no sentence pairs, so one token type is enough.
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **special,
    )


def _t5(dimensions: ModelDimensions, special: dict) -> PretrainedConfig:
    # The sentinels of span corruption take the last T5_SENTINELS ids (pretrain.objectives).
    # NOTE: the saved tokenizer does not name these ids, so decoding one yields no text.
    special = {**special, "vocab_size": special["vocab_size"] + T5_SENTINELS}
    return T5Config(
        d_model=dimensions.hidden_size,
        d_kv=dimensions.hidden_size // dimensions.num_heads,
        d_ff=dimensions.intermediate_size,
        num_layers=dimensions.num_layers,
        num_decoder_layers=dimensions.num_layers,
        num_heads=dimensions.num_heads,
        dropout_rate=0.0,
        # T5 starts decoding from the padding token.
        decoder_start_token_id=special["pad_token_id"],
        **special,
    )


def build_model(config: PretrainedConfig) -> PreTrainedModel:
    if config.model_type == "bert":
        return AutoModelForMaskedLM.from_config(config)
    if config.model_type == "t5":
        return AutoModelForSeq2SeqLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def parameter_count(model: PreTrainedModel) -> int:
    # model.parameters() yields a tied embedding once, so it is counted once.
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass(frozen=True)
class FlopsEstimate:
    """The figures of a built model that its training FLOPs per token depend on.

    Read them from the unwrapped model, before FSDP shards it. For t5, `matmul_parameters` and
    `layers` are the decoder's (with the output layer) and the `encoder_*` fields the encoder's.
    """

    architecture: str
    matmul_parameters: int
    layers: int
    attention_width: int
    encoder_parameters: int = 0
    encoder_layers: int = 0

    @classmethod
    def of(cls, model: PreTrainedModel) -> FlopsEstimate:
        config = model.config
        embeddings = _embedding_tables(model)
        head = model.get_output_embeddings().weight
        if config.model_type != "t5":
            matmul = _matmul_parameters(model, embeddings)
            if id(head) in embeddings:
                matmul += head.numel()  # a tied output layer multiplies, so it counts once
            return cls(config.model_type, matmul, config.num_hidden_layers, config.hidden_size)
        # The decoder's cross-attention projects the keys and values from the encoder output,
        # so those weights multiply encoder tokens.
        cross_key_value = sum(
            layer.EncDecAttention.k.weight.numel() + layer.EncDecAttention.v.weight.numel()
            for layer in model.decoder.modules() if isinstance(layer, T5LayerCrossAttention)
        )
        return cls(
            config.model_type,
            matmul_parameters=(_matmul_parameters(model.decoder, embeddings) - cross_key_value
                               + head.numel()),
            layers=config.num_decoder_layers,
            attention_width=config.num_heads * config.d_kv,
            encoder_parameters=_matmul_parameters(model.encoder, embeddings) + cross_key_value,
            encoder_layers=config.num_layers,
        )

    def per_token(self, sequence_length: int) -> int:
        """Return the training FLOPs per packed train token at this sequence length."""
        if self.architecture != "t5":
            return flops.flops_per_token(self.matmul_parameters, self.layers,
                                         self.attention_width, sequence_length)
        encoder_tokens, decoder_tokens = span_corruption_lengths(sequence_length)
        return flops.encoder_decoder_flops_per_token(
            self.encoder_parameters, self.matmul_parameters, self.encoder_layers, self.layers,
            self.attention_width, encoder_tokens, decoder_tokens, sequence_length,
        )


def _embedding_tables(model: torch.nn.Module) -> set[int]:
    """Return the ids of the embedding weights (tokens, positions, T5's relative positions)."""
    return {id(module.weight) for module in model.modules()
            if isinstance(module, torch.nn.Embedding)}


def _matmul_parameters(module: torch.nn.Module, embeddings: set[int]) -> int:
    return sum(parameter.numel() for parameter in module.parameters()
               if id(parameter) not in embeddings)
