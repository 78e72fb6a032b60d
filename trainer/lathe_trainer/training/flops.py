"""Compute estimates for a transformer: training FLOPs per token and a compute-optimal budget.

The PretrainJob reports these next to the corpus size, so a user sees whether the corpus is
large enough for the model before spending the compute, and uses the FLOPs per token for the
model FLOPs utilization (MFU).

The estimates count model FLOPs, the matrix multiplications of one forward and one backward
pass. Activations that gradient checkpointing recomputes are not counted again, as in the MFU
of Chowdhery et al. 2022 (PaLM, Appendix B).
"""

from __future__ import annotations

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla) find
# that parameters and training tokens should grow in equal proportion, at about 20 tokens
# per parameter for a compute-optimal model.
TOKENS_PER_PARAMETER = 20


def flops_per_token(
    matmul_parameters: int, layers: int, attention_width: int, sequence_length: int
) -> int:
    """Estimate the training FLOPs (forward and backward) of one token of a decoder-only or
    encoder-only transformer.

    Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", section 2.1) estimate a
    forward pass at 2N + 2 * n_layer * n_ctx * d_attn FLOPs per token, and training at three
    times the forward pass. The attention term here, 12 * layers * attention_width *
    sequence_length, is twice Kaplan's term times three: it counts the scores Q·K^T and the
    weighted sum of V separately, over the whole sequence, as PaLM's MFU formula does.

    `matmul_parameters` (N) are the weights that multiply activations: every parameter except
    the input embedding tables, which are looked up, not multiplied. An output layer tied to
    the input embedding is a multiplication, so it counts once. torchtitan's
    `get_num_params(exclude_embedding=True)` subtracts its untied token embedding the same way.
    """
    return 6 * matmul_parameters + 12 * layers * attention_width * sequence_length


def encoder_decoder_flops_per_token(
    encoder_parameters: int,
    decoder_parameters: int,
    encoder_layers: int,
    decoder_layers: int,
    attention_width: int,
    encoder_tokens: int,
    decoder_tokens: int,
    sequence_length: int,
) -> int:
    """Estimate the training FLOPs of an encoder-decoder model per token of the packed sequence.

    One packed sequence of `sequence_length` tokens becomes `encoder_tokens` encoder inputs and
    `decoder_tokens` decoder inputs (T5's span corruption shortens both). `encoder_parameters`
    multiply each encoder token: the encoder's weights and the decoder's cross-attention key and
    value projections. `decoder_parameters` multiply each decoder token: the rest of the decoder
    and the output layer. The attention terms follow `flops_per_token`: encoder self-attention
    over the encoder tokens, decoder self-attention over the decoder tokens, and
    cross-attention from each decoder token over the encoder tokens.
    """
    weights = 6 * (encoder_parameters * encoder_tokens + decoder_parameters * decoder_tokens)
    attention = 12 * attention_width * (
        encoder_layers * encoder_tokens ** 2
        + decoder_layers * decoder_tokens * (decoder_tokens + encoder_tokens)
    )
    return round((weights + attention) / sequence_length)


def compute_optimal_tokens(parameters: int) -> int:
    """Return the training tokens of a compute-optimal model of this size (Chinchilla)."""
    return TOKENS_PER_PARAMETER * parameters
