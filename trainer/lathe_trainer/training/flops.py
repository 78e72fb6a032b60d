"""Compute estimates for a transformer: training FLOPs per token and a compute-optimal budget.

The PretrainJob reports these next to the corpus size, so a user sees whether the corpus is
large enough for the model before spending the compute.
"""

from __future__ import annotations

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla) find
# that parameters and training tokens should grow in equal proportion, at about 20 tokens
# per parameter for a compute-optimal model.
TOKENS_PER_PARAMETER = 20


def flops_per_token(parameters: int, layers: int, hidden_size: int, sequence_length: int) -> int:
    """Estimate the training FLOPs (forward and backward) spent on one token.

    Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", section 2.1) estimate a
    forward pass at C_forward = 2N + 2 * n_layer * n_ctx * d_model FLOPs per token, and
    training at three times the forward pass, so C is about 6N. The attention term here,
    12 * layers * hidden_size * sequence_length, is twice Kaplan's term times three: it counts
    the scores Q·K^T and the weighted sum of V separately, as the model FLOPs utilization
    formula of Chowdhery et al. 2022 (PaLM, Appendix B) does.

    N is every parameter, embeddings included, as `model.num_parameters()` counts them, where
    Kaplan counts non-embedding parameters only.
    """
    return 6 * parameters + 12 * layers * hidden_size * sequence_length


def compute_optimal_tokens(parameters: int) -> int:
    """Return the training tokens of a compute-optimal model of this size (Chinchilla)."""
    return TOKENS_PER_PARAMETER * parameters
