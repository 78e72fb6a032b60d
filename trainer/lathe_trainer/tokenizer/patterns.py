"""Protected patterns: regular expressions whose matches are never split from their context.

The pre-tokenizer built here runs in three steps:

1. Split the text on the protected patterns, isolating each match. The whitespace before a
   match ends up in the piece before it. So a code such as `E11.9` is the same pre-token at
   the start of a sentence, after a space or a parenthesis, and at the end of a line.
2. Split every piece with the GPT-2 pre-tokenizer expression, with the protected patterns as
   the first alternatives so that an isolated match stays whole.
3. Map bytes to the byte-level alphabet, without a second regex split.

A match becomes one token when it is in the vocabulary: the terms added by `training` and the
BPE model's `ignore_merges` make a vocabulary entry win over the merges. A match that is not in
the vocabulary falls back to a fixed split: the BPE merges of that match alone, the same in
every context.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import regex
from tokenizers import Regex, pre_tokenizers

from lathe.api.common import quote_value
from lathe.api.tokenizer import ProtectedPattern, oniguruma_rejection, regex_syntax_error
from lathe_trainer.stage import StageConfig, StageError, resolve_data_path

log = logging.getLogger(__name__)

# The pre-tokenizer expression of GPT-2, as `tokenizers` 0.23 uses it in its ByteLevel
# pre-tokenizer: contractions, letter runs, digit runs, punctuation runs, each with at most one
# leading space, and whitespace runs.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# How many rejected vocabulary terms the report lists by value.
REJECTED_EXAMPLES = 10


@dataclass(frozen=True)
class Match:
    pattern: str
    start: int
    end: int
    text: str


@dataclass
class Vocabulary:
    """Terms of one pattern's vocabulary file, and the lines that were not usable."""

    pattern: str
    path: str
    terms: list[str] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    rejected_examples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "path": self.path,
            "rows": self.rows,
            "terms": len(self.terms),
            "rejected": self.rejected,
            "rejected_examples": self.rejected_examples,
        }


class SpanFinder:
    """The matches of one expression, found by Oniguruma as the tokenizer finds them.

    The `tokenizers` Split pre-tokenizer is the one Python interface to its Oniguruma engine:
    with behaviour "isolated" it returns the matches and the text between them, with "removed"
    only the text between them, each with character offsets. The matches are the pieces of
    the first list that are not in the second.
    """

    def __init__(self, expression: str):
        compiled = Regex(expression)
        self._isolated = pre_tokenizers.Split(compiled, behavior="isolated")
        self._removed = pre_tokenizers.Split(compiled, behavior="removed")

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Return the (start, end) character offsets of the matches in `text`, leftmost first."""
        between = {offsets for _, offsets in self._removed.pre_tokenize_str(text)}
        return [offsets for _, offsets in self._isolated.pre_tokenize_str(text)
                if offsets not in between]

    def matches_whole(self, text: str) -> bool:
        """Return whether the first match in `text` covers all of it."""
        return bool(text) and self.spans(text)[:1] == [(0, len(text))]


def combined_expression(patterns: list[ProtectedPattern], lowercase: bool) -> str:
    """Return the patterns as one Oniguruma expression, in spec order.

    A lowercasing tokenizer matches them on lowercased text, so they then ignore case.
    """
    expression = "|".join(f"(?:{pattern.regex})" for pattern in patterns)
    return f"(?i:{expression})" if lowercase else expression


def lowercased(text: str) -> tuple[str, list[int]]:
    """Return `text` lowercased and, for each character of the result, its position in `text`.

    A few characters lowercase to two (İ to i and a combining dot), so positions can shift.
    """
    characters: list[str] = []
    origin: list[int] = []
    for position, character in enumerate(text):
        lower = character.lower()
        characters.append(lower)
        origin.extend([position] * len(lower))
    return "".join(characters), origin


class ProtectedMatcher:
    """The spec's protected patterns, matched with Oniguruma for the report and the tokenizer."""

    def __init__(self, patterns: list[ProtectedPattern], lowercase: bool):
        self.patterns = patterns
        self.lowercase = lowercase
        # The tokenizer's own expression, in spec order. A lowercasing tokenizer matches it,
        # ignoring case, on the lowercased text, so the matches are searched for there too.
        self._combined = SpanFinder(self.tokenizer_expression()) if patterns else None
        # Oniguruma reports no group names through the pre-tokenizer, so the regex module
        # finds which pattern a match came from. MULTILINE, because ^ and $ match at line
        # ends in Oniguruma.
        flags = regex.MULTILINE | (regex.IGNORECASE if lowercase else 0)
        self._anchored = [regex.compile(pattern.regex, flags) for pattern in patterns]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def tokenizer_expression(self) -> str:
        return combined_expression(self.patterns, self.lowercase)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Return the (start, end) offsets in `text` of the matches, as the tokenizer finds them."""
        return [(start, end) for start, end, _ in self._search(text)]

    def finditer(self, text: str) -> Iterator[Match]:
        """Yield the non-overlapping matches in `text`, leftmost first, as the tokenizer finds
        them, each with the pattern it came from. Offsets and match texts refer to `text`
        itself, also when it is lowercased for the search."""
        for start, end, searched in self._search(text):
            yield Match(self.patterns[self._pattern_index(searched)].name, start, end,
                        text[start:end])

    def _search(self, text: str) -> Iterator[tuple[int, int, tuple[str, int, int]]]:
        """Yield each match's offsets in `text` and its place in the searched text."""
        if self._combined is None:
            return
        searched, origin = lowercased(text) if self.lowercase else (text, None)
        for start, end in self._combined.spans(searched):
            place = (searched, start, end)
            if origin is not None:
                start, end = origin[start], origin[end - 1] + 1
            yield start, end, place

    def _pattern_index(self, place: tuple[str, int, int]) -> int:
        """Return the index of the pattern that a match of the combined expression came from.

        Alternation tries the patterns in spec order at the match's start, so it is the first
        pattern that matches there. NOTE: the regex module decides this, so where it reads a
        pattern otherwise than Oniguruma, the match counts for another pattern.
        """
        if len(self.patterns) == 1:
            return 0
        searched, start, end = place
        first = None
        for index, compiled in enumerate(self._anchored):
            found = compiled.match(searched, start)
            if found is None:
                continue
            if found.end() == end:
                return index
            first = index if first is None else first
        return 0 if first is None else first

    def pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
        if not self.patterns:
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        protected = self.tokenizer_expression()
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(protected), behavior="isolated"),
            pre_tokenizers.Split(Regex(f"{protected}|{GPT2_PATTERN}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])


def compile_patterns(
    config: StageConfig, patterns: list[ProtectedPattern], lowercase: bool
) -> ProtectedMatcher:
    """Check each pattern and return the matcher.

    The API model checks the syntax with Python's re (or the regex module, for Unicode property
    classes), so this check repeats it for specs that bypassed the API. It also compiles each
    pattern in Oniguruma, the engine of `tokenizers`, which rejects some Python-only syntax.
    """
    for index, pattern in enumerate(patterns):
        where = f"spec.protectedPatterns[{index}].regex"
        problem = regex_syntax_error(pattern.regex)
        if problem is not None:
            raise StageError(
                config, where,
                f"invalid regular expression {quote_value(pattern.regex)}: {problem}.",
            )
        try:
            Regex(pattern.regex)
        except Exception as error:  # tokenizers raises a bare Exception for Oniguruma errors.
            raise StageError(config, where, oniguruma_rejection(pattern.regex, error)) from None
    if patterns:
        try:
            Regex(combined_expression(patterns, lowercase))
        except Exception as error:  # tokenizers raises a bare Exception for Oniguruma errors.
            raise StageError(
                config, "spec.protectedPatterns",
                f"each pattern compiles on its own, but their combination, which the tokenizer "
                f"uses, does not: {error}; check that no pattern leaves a group or a comment "
                "open.",
            ) from None
    return ProtectedMatcher(patterns, lowercase)


def dotted_form(term: str, after: int | None) -> str | None:
    """Return `term` with a `.` after `after` characters (`E119` -> `E11.9`), if that applies."""
    if after is None or len(term) <= after or "." in term:
        return None
    return f"{term[:after]}.{term[after:]}"


def load_vocabulary(
    config: StageConfig, index: int, pattern: ProtectedPattern, lowercase: bool
) -> Vocabulary | None:
    """Read a pattern's vocabulary file: the first CSV column of each row is a term.

    A term is kept only when the pattern's first match in it covers all of it, because only
    then does the pre-tokenizer isolate it. Blank rows and terms the pattern does not match are counted as
    rejected and listed in the report.
    """
    if pattern.vocabulary_file is None:
        return None
    path = resolve_data_path(config, pattern.vocabulary_file)
    if not path.is_file():
        raise StageError(
            config, f"spec.protectedPatterns[{index}].vocabularyFile",
            f"file {pattern.vocabulary_file!r} (resolved to {path}) does not exist; give a path "
            "relative to the data directory or an absolute path.",
        )
    vocabulary = Vocabulary(pattern=pattern.name, path=str(path))
    expression = SpanFinder(f"(?i:{pattern.regex})" if lowercase else pattern.regex)
    seen: set[str] = set()
    for row in _read_rows(path):
        vocabulary.rows += 1
        term = row[0].strip() if row else ""
        forms = [term, dotted_form(term, pattern.dotted_form_after)]
        for form in filter(None, forms):
            form = lowercased(form)[0] if lowercase else form
            if not expression.matches_whole(form):
                vocabulary.rejected += 1
                if len(vocabulary.rejected_examples) < REJECTED_EXAMPLES:
                    vocabulary.rejected_examples.append(form)
            elif form not in seen:
                seen.add(form)
                vocabulary.terms.append(form)
        if not term:
            vocabulary.rejected += 1
    if vocabulary.rejected:
        log.warning(
            "Pattern %s: %d of the terms in %s do not match the pattern and get no token of "
            "their own, for example %s.",
            pattern.name, vocabulary.rejected, path, vocabulary.rejected_examples,
        )
    return vocabulary


def _read_rows(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        yield from csv.reader(handle)
