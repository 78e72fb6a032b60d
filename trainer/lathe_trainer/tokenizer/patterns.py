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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex, pre_tokenizers

from lathe.api.common import quote_value
from lathe.api.tokenizer import ProtectedPattern, regex_error_message
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


class ProtectedMatcher:
    """The spec's protected patterns, compiled for Python (evaluation) and the tokenizer."""

    def __init__(self, patterns: list[ProtectedPattern], lowercase: bool):
        self.patterns = patterns
        self.lowercase = lowercase
        # Named groups let a combined match say which pattern it came from. Alternation order
        # is spec order, the same order the tokenizer's expression tries them in.
        combined = "|".join(f"(?P<p{index}>{p.regex})" for index, p in enumerate(patterns))
        self._python = re.compile(combined) if patterns else None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def tokenizer_expression(self) -> str:
        """Return the patterns as one Oniguruma expression, in spec order.

        A lowercasing tokenizer sees lowercased text, so the patterns then match ignoring case.
        """
        expression = "|".join(f"(?:{pattern.regex})" for pattern in self.patterns)
        return f"(?i:{expression})" if self.lowercase else expression

    def finditer(self, text: str) -> Iterator[Match]:
        """Yield the non-overlapping matches in `text`, leftmost first, as the spec defines them.

        NOTE: this uses Python's `re`, while the tokenizer uses Oniguruma. The two agreed on
        digit, word and word-boundary classes over full-width digits and accented letters in
        `tokenizers` 0.23, but where they differ the report's kept_apart_share drops below 1.0.
        """
        if self._python is None:
            return
        for found in self._python.finditer(text):
            if found.end() == found.start():
                continue
            index = int(found.lastgroup[1:])
            yield Match(self.patterns[index].name, found.start(), found.end(), found.group())

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
    """Check each pattern in both regex engines and return the matcher.

    The API model checks only Python's `re`, so this check repeats it for specs that bypassed
    the API. It also compiles each pattern in Oniguruma, the engine of `tokenizers`, which
    rejects some Python-only syntax.
    """
    for index, pattern in enumerate(patterns):
        where = f"spec.protectedPatterns[{index}].regex"
        try:
            re.compile(pattern.regex)
        except re.error as error:
            raise StageError(
                config, where,
                f"invalid regular expression {quote_value(pattern.regex)}: "
                f"{regex_error_message(pattern.regex, error)}.",
            ) from None
        try:
            Regex(pattern.regex)
        except Exception as error:  # tokenizers raises a bare Exception for Oniguruma errors.
            raise StageError(
                config, where,
                f"regular expression {quote_value(pattern.regex)} is valid in Python but the "
                f"tokenizer's engine (Oniguruma) rejects it: {error}; rewrite it without "
                "Python-only syntax such as (?P<name>...).",
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

    A term is kept only when the pattern matches all of it, because only then does the
    pre-tokenizer isolate it. Blank rows and terms the pattern does not match are counted as
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
    expression = re.compile(pattern.regex, re.IGNORECASE if lowercase else 0)
    seen: set[str] = set()
    for row in _read_rows(path):
        vocabulary.rows += 1
        term = row[0].strip() if row else ""
        forms = [term, dotted_form(term, pattern.dotted_form_after)]
        for form in filter(None, forms):
            form = form.lower() if lowercase else form
            if not expression.fullmatch(form):
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
