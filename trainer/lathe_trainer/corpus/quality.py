"""A per-document quality score in [0, 1], written into each Corpus output record.

The score is a cheap heuristic in the spirit of the Gopher quality filters (Rae et al. 2021):
prose has mostly alphabetic words, a mean word length of about 3 to 10 characters, and few
symbols outside ordinary punctuation. It multiplies three factors, each 1.0 for clean prose:

- the fraction of words that contain a letter;
- 1.0 for a mean word length in [3, 10], falling in proportion outside that range;
- 1 - 10 * (fraction of non-space characters that are neither letters, digits nor common
  punctuation), floored at 0, so text with 10% or more such symbols scores 0.

A PretrainJob curriculum uses it to train on clean text first (spec.curriculum minQuality).
"""

from __future__ import annotations

PUNCTUATION = frozenset(".,;:!?'\"()[]-/%")
MIN_MEAN_WORD_LENGTH = 3.0
MAX_MEAN_WORD_LENGTH = 10.0
# Score 0 at this fraction of symbol characters.
MAX_SYMBOL_FRACTION = 0.1


def quality_score(text: str) -> float:
    """Return the document's quality score, rounded to 4 decimals (0.0 for empty text)."""
    words = text.split()
    if not words:
        return 0.0
    alphabetic = sum(any(char.isalpha() for char in word) for word in words) / len(words)
    mean_length = sum(len(word) for word in words) / len(words)
    if mean_length < MIN_MEAN_WORD_LENGTH:
        length = mean_length / MIN_MEAN_WORD_LENGTH
    elif mean_length > MAX_MEAN_WORD_LENGTH:
        length = MAX_MEAN_WORD_LENGTH / mean_length
    else:
        length = 1.0
    characters = "".join(words)
    symbols = sum(not char.isalnum() and char not in PUNCTUATION for char in characters)
    symbol_factor = max(0.0, 1.0 - symbols / len(characters) / MAX_SYMBOL_FRACTION)
    return round(alphabetic * length * symbol_factor, 4)
