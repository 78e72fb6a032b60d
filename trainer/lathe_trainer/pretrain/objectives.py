"""Pretraining objectives: how a packed token sequence becomes model inputs and labels.

The PretrainJob packs every split into fixed-length sequences (see pretrain.data). Each
objective turns a micro-batch of those sequences into a `Batch`, the keyword inputs of the
model's forward pass and the labels that the summed token loss (training.loss) scores:

- causalLM (llama, gpt2): the sequence is both input and label, shifted by one position.
- maskedLM (bert): BERT's recipe. 15% of the non-special tokens are selected, and at least
  one per sequence. Of those, 80% become the mask token, 10% a random token and 10% stay
  unchanged. Only selected tokens are labelled, so the loss and perplexity are over the
  masked tokens.
- spanCorruption (t5): T5's recipe with noise density 0.15 and mean span length 3. Each noise
  span in the encoder input is replaced by one sentinel token, and the decoder predicts every
  sentinel followed by the tokens it replaced, then end-of-text.

Sentinels: the t5 model's vocabulary is the tokenizer's plus `T5_SENTINELS` ids at its end,
and sentinel i is the id `vocab_size - 1 - i`, the order T5 uses for `<extra_id_i>`. No text
encodes to these ids, so a sentinel never collides with a real token, and the Tokenizer needs
no extra special tokens.

The random choices draw from the generator given, or from torch's global CPU generator, which
checkpoints save and restore per process, so a resumed run masks exactly as an uninterrupted
one with the same number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lathe.api.tokenizer import MASK_TOKEN
from lathe_trainer.training.loss import IGNORE_INDEX

MASK = MASK_TOKEN
MASK_PROBABILITY = 0.15
# Of the selected tokens: 80% are masked, 10% replaced at random, 10% left unchanged.
MASK_REPLACE_FRACTION = 0.8
RANDOM_REPLACE_FRACTION = 0.1
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# T5's default number of extra ids (sentinels).
T5_SENTINELS = 100


@dataclass
class Batch:
    """One micro-batch: the model's keyword inputs and the labels the loss scores."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    # True when the logits at position t predict the label at t + 1 (causal LM).
    shift: bool

    def to(self, device: torch.device) -> Batch:
        inputs = {name: tensor.to(device) for name, tensor in self.inputs.items()}
        return Batch(inputs, self.labels.to(device), self.shift)


class CausalLM:
    """Next-token prediction: the input sequence is its own label."""

    name = "causalLM"

    def prepare(self, sequences: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        return Batch({"input_ids": sequences}, sequences, shift=True)


class MaskedLM:
    """BERT's masked language modelling with 80/10/10 replacement."""

    name = "maskedLM"

    def __init__(self, mask_id: int, vocab_size: int, special_ids: list[int]):
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def prepare(self, sequences: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        inputs = sequences.clone()
        labels = sequences.clone()
        maskable = ~torch.isin(sequences, self.special_ids)
        selected = (torch.rand(sequences.shape, generator=generator) < MASK_PROBABILITY) & maskable
        _select_one_where_none(selected, maskable, generator)
        labels[~selected] = IGNORE_INDEX
        # One draw per token decides its replacement: [0, 0.8) mask, [0.8, 0.9) random token.
        choice = torch.rand(sequences.shape, generator=generator)
        masked = selected & (choice < MASK_REPLACE_FRACTION)
        randomized = selected & (choice >= MASK_REPLACE_FRACTION) & (
            choice < MASK_REPLACE_FRACTION + RANDOM_REPLACE_FRACTION
        )
        inputs[masked] = self.mask_id
        random_tokens = torch.randint(self.vocab_size, sequences.shape, generator=generator)
        inputs[randomized] = random_tokens[randomized]
        return Batch({"input_ids": inputs}, labels, shift=False)


def _select_one_where_none(
    selected: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator | None
) -> None:
    """Select one random maskable token, in place, in each row that has none selected.

    A short sequence often draws no token at 15% (0.85 ** 8 = 27% of 8-token rows). An
    accumulated batch without a labelled token has no loss, so its step would fail, and a
    resumed run restores the RNG and fails at the same step again. BERT's own
    create_pretraining_data.py (google-research/bert) predicts
    max(1, round(0.15 * length)) tokens per sequence, so it labels at least one as well.
    """
    empty = ~selected.any(dim=-1) & maskable.any(dim=-1)
    if not bool(empty.any()):
        return
    scores = torch.rand(selected.shape, generator=generator).masked_fill(~maskable, -1.0)
    rows = empty.nonzero(as_tuple=True)[0]
    selected[rows, scores[rows].argmax(dim=-1)] = True


def span_counts(sequence_length: int) -> tuple[int, int]:
    """Return (noise tokens, noise spans) of a sequence, fixed by its length as in T5."""
    noise_tokens = max(1, min(sequence_length - 1, round(sequence_length * NOISE_DENSITY)))
    spans = max(1, round(noise_tokens / MEAN_NOISE_SPAN_LENGTH))
    return noise_tokens, spans


def span_corruption_lengths(sequence_length: int) -> tuple[int, int]:
    """Return the (encoder input, decoder input) lengths that one sequence becomes."""
    noise_tokens, spans = span_counts(sequence_length)
    # The encoder input is the kept tokens and one sentinel per span, then end-of-text. The
    # decoder input is every sentinel followed by its noise tokens, then end-of-text.
    return sequence_length - noise_tokens + spans + 1, noise_tokens + spans + 1


class SpanCorruption:
    """T5's span corruption, which gives all sequences of one length the same sizes."""

    name = "spanCorruption"

    def __init__(self, vocab_size: int, eos_id: int, decoder_start_id: int):
        # vocab_size is the model's, sentinels included.
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.decoder_start_id = decoder_start_id

    def sentinel(self, index: int) -> int:
        return self.vocab_size - 1 - index

    def prepare(self, sequences: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        pairs = [self._corrupt(row, generator) for row in sequences]
        input_ids = torch.stack([source for source, _ in pairs])
        labels = torch.stack([target for _, target in pairs])
        # The decoder reads the labels shifted right behind the start token, as T5's _shift_right.
        start = torch.full((labels.size(0), 1), self.decoder_start_id, dtype=labels.dtype)
        decoder_input_ids = torch.cat([start, labels[:, :-1]], dim=1)
        inputs = {"input_ids": input_ids, "decoder_input_ids": decoder_input_ids}
        return Batch(inputs, labels, shift=False)

    def _corrupt(
        self, row: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = row.numel()
        noise_tokens, spans = span_counts(length)
        # Spans alternate kept, noise, kept, noise ... starting with kept tokens, as in T5.
        noise_lengths = _random_partition(noise_tokens, spans, generator)
        kept_lengths = _random_partition(length - noise_tokens, spans, generator)
        source: list[torch.Tensor] = []
        target: list[torch.Tensor] = []
        start = 0
        for index, (kept, noise) in enumerate(zip(kept_lengths, noise_lengths)):
            sentinel = torch.tensor([self.sentinel(index)], dtype=row.dtype)
            source += [row[start:start + kept], sentinel]
            target += [sentinel, row[start + kept:start + kept + noise]]
            start += kept + noise
        eos = torch.tensor([self.eos_id], dtype=row.dtype)
        return torch.cat([*source, eos]), torch.cat([*target, eos])


def _random_partition(
    total: int, parts: int, generator: torch.Generator | None
) -> list[int]:
    """Split total into `parts` positive integers, uniformly over the possible splits."""
    cuts = (torch.randperm(total - 1, generator=generator)[:parts - 1] + 1).sort().values
    bounds = [0, *cuts.tolist(), total]
    return [high - low for low, high in zip(bounds, bounds[1:])]


Objective = CausalLM | MaskedLM | SpanCorruption
