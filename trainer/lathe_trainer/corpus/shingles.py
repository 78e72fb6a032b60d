"""Word tokens and word n-grams for near-duplicate detection and decontamination.

`word_tokens`, used by near-duplicate detection, returns case-folded runs of letters and
digits with inner `.`, `,`, `/` and `-` kept, so `E11.9`, `5`, `mg/kg` and `1,250` are each
one token and differ from `E11.8` or `1,350`. Other punctuation is dropped: a changed comma or
bracket should not hide a copy.

`alphanumeric_tokens`, used by decontamination, splits at every punctuation mark as well, so
text does not depend on how punctuation was spaced: `IL-2 (receptor)` and the CoNLL tokens
joined with spaces, `IL - 2 ( receptor )`, give the same tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"\w+(?:[.,/\-]\w+)*")
_ALPHANUMERIC = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def alphanumeric_tokens(text: str) -> list[str]:
    """Return the case-folded runs of word characters (letters, digits, `_`) of text."""
    return _ALPHANUMERIC.findall(text.casefold())


def word_ngrams(tokens: Sequence[str], size: int) -> set[str]:
    """Return the distinct n-grams of `size` tokens, each joined with spaces.

    A document shorter than `size` tokens yields one n-gram of all its tokens, so that short
    documents still have something to compare.
    """
    if len(tokens) < size:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + size]) for i in range(len(tokens) - size + 1)}
