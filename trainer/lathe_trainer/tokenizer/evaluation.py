"""Measure a trained tokenizer on the validation split and check its special tokens.

Fertility is tokens per whitespace-separated word; bytes per token is UTF-8 bytes of the text
per token. A protected match is kept whole when exactly one token covers its characters, and
kept apart when no token crosses its edges (it may still be several tokens, none shared with
the text around it). Both are read from the encoding's offsets into the original text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Encoding, Tokenizer

from lathe_trainer.tokenizer.patterns import Match, ProtectedMatcher

# Texts are encoded in batches; `encode_batch` runs them on the library's own threads.
BATCH_SIZE = 256
# How many protected matches that were split the report lists by value, per pattern.
SPLIT_EXAMPLES = 10


class Evaluation:
    """Running totals over the validation split."""

    def __init__(self, matcher: ProtectedMatcher):
        self.matcher = matcher
        self.documents = 0
        self.words = 0
        self.bytes = 0
        self.tokens = 0
        self.matches: Counter = Counter()
        self.whole: Counter = Counter()
        self.apart: Counter = Counter()
        self.split_examples: dict[str, list[str]] = {p.name: [] for p in matcher.patterns}

    def add(self, text: str, encoding: Encoding) -> None:
        self.documents += 1
        self.words += len(text.split())
        self.bytes += len(text.encode("utf-8"))
        self.tokens += len(encoding.ids)
        if not self.matcher:
            return
        for match in self.matcher.finditer(text):
            self.matches[match.pattern] += 1
            overlapping = _overlapping(encoding, match)
            if all(match.start <= start and end <= match.end for start, end in overlapping):
                self.apart[match.pattern] += 1
            if overlapping == [(match.start, match.end)]:
                self.whole[match.pattern] += 1
            else:
                examples = self.split_examples[match.pattern]
                # Distinct terms, so that a term split in many documents takes one place.
                if len(examples) < SPLIT_EXAMPLES and match.text not in examples:
                    examples.append(match.text)

    def report(self) -> dict:
        patterns = {
            name: {
                "matches": self.matches[name],
                "kept_whole": self.whole[name],
                "kept_whole_share": _share(self.whole[name], self.matches[name]),
                "kept_apart": self.apart[name],
                "kept_apart_share": _share(self.apart[name], self.matches[name]),
                "split_examples": self.split_examples[name],
            }
            for name in self.split_examples
        }
        matches = sum(self.matches.values())
        return {
            "documents": self.documents,
            "words": self.words,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "fertility_tokens_per_word": _share(self.tokens, self.words),
            "bytes_per_token": _share(self.bytes, self.tokens),
            "protected_matches": matches,
            "protected_kept_whole_share": _share(sum(self.whole.values()), matches),
            "protected_kept_apart_share": _share(sum(self.apart.values()), matches),
            "protected_patterns": patterns,
        }


def _overlapping(encoding: Encoding, match: Match) -> list[tuple[int, int]]:
    """Return the offsets of the tokens that share at least one character with the match."""
    return [
        offsets for offsets in encoding.offsets
        if offsets[0] < match.end and offsets[1] > match.start
    ]


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def evaluate(tokenizer: Tokenizer, texts: Iterable[str], matcher: ProtectedMatcher) -> dict:
    """Encode every text and return fertility, bytes per token and protected-match wholeness."""
    evaluation = Evaluation(matcher)
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == BATCH_SIZE:
            _add_batch(evaluation, tokenizer, batch)
            batch = []
    _add_batch(evaluation, tokenizer, batch)
    return evaluation.report()


def _add_batch(evaluation: Evaluation, tokenizer: Tokenizer, batch: list[str]) -> None:
    if not batch:
        return
    for text, encoding in zip(batch, tokenizer.encode_batch(batch, add_special_tokens=False)):
        evaluation.add(text, encoding)


def special_token_fragments(tokenizer: Tokenizer, special_tokens: list[str]) -> list[str]:
    """Return vocabulary entries that look like pieces of a special token.

    An entry counts when its text, without the leading space, has two or more characters, is
    part of a special token (ignoring case), and contains one of that token's punctuation
    characters: `|>`, `<|endof` and `[sep` count, but `end` or `sep` from ordinary words do not.
    """
    decoder = tokenizer.decoder
    fragments = []
    for entry in tokenizer.get_vocab(with_added_tokens=False):
        if entry in special_tokens:
            continue
        text = decoder.decode([entry]).lstrip().lower()
        if len(text) < 2:
            continue
        for token in special_tokens:
            punctuation = {char for char in token if not char.isalnum()}
            if text in token.lower() and punctuation & set(text):
                fragments.append(entry)
                break
    return sorted(fragments)


def special_token_ids(tokenizer: Tokenizer, special_tokens: list[str]) -> dict[str, list[int]]:
    """Return the ids each special token encodes to; each should be a single id."""
    return {
        token: tokenizer.encode(token, add_special_tokens=False).ids for token in special_tokens
    }
