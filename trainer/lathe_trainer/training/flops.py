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

    Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Table 1) count a forward
    pass as 2N FLOPs per token for N parameters plus an attention term, and the backward pass
    as twice the forward, so training costs 6N plus three times the attention term. The
    attention term here is 12 * layers * hidden_size * sequence_length: the forward pass
    computes the scores Q·K^T and the weighted sum of V, each 2 * hidden_size *
    sequence_length FLOPs per token and layer, times three for training. This is the form
    used for model FLOPs utilization by Chowdhery et al. 2022 (PaLM, Appendix B).

    N is every parameter, embeddings included, as `model.num_parameters()` counts them.
    """
    return 6 * parameters + 12 * layers * hidden_size * sequence_length


def compute_optimal_tokens(parameters: int) -> int:
    """Return the training tokens of a compute-optimal model of this size (Chinchilla)."""
    return TOKENS_PER_PARAMETER * parameters
