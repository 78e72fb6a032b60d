"""The Tokenizer resource: train a tokenizer on a Corpus, with protected domain patterns."""

from __future__ import annotations

import enum
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import regex
from pydantic import Field, field_validator, model_validator

from lathe.api.common import (
    NAMED_LIST_SCHEMA,
    SET_LIST_SCHEMA,
    ApiModel,
    CelRule,
    DataPath,
    LocalObjectReference,
    PodMetadata,
    PrinterColumn,
    Resource,
    ResourceRequirements,
    Scheduling,
    StageStatus,
    StorageSpec,
    quote_value,
    rule_error,
)

# The special tokens that every downstream stage relies on: end of document (also bos/eos),
# padding and unknown. A spec may add more, but it cannot drop these.
REQUIRED_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<unk>")
# The token that masked language modelling (PretrainJob architecture bert) puts in place of the
# tokens it predicts.
MASK_TOKEN = "<mask>"


class TokenizerModel(str, enum.Enum):
    BYTE_LEVEL_BPE = "byteLevelBPE"


# Texts a protected pattern is tried on for empty matches: empty, words, codes, units.
EMPTY_MATCH_SAMPLES = ("", "a", "Type 2 diabetes (E11.9) at 5 mg/kg, E119.")


# The fix for each error of Python's re module (wording of Python 3.11) that a hand-written
# pattern most often has, keyed by the start of the error message.
_REGEX_FIXES = (
    ("missing ), unterminated subpattern",
     "close the group with ), or write \\( to match a literal parenthesis"),
    ("unbalanced parenthesis",
     "remove the extra ), or write \\) to match a literal parenthesis"),
    ("unterminated character set",
     "close the set with ], or write \\[ to match a literal bracket"),
    ("nothing to repeat", "put the character or group to repeat before the quantifier, or "
     "escape the quantifier as \\*, \\+ or \\?"),
    ("multiple repeat", "keep one quantifier, or group the repeated part as (?:...)"),
    ("bad escape", "remove the backslash, or write \\\\ to match a literal backslash"),
)


@dataclass(frozen=True)
class PropertyClass:
    """A Unicode property class in a pattern, such as \\p{Lu}, \\P{L} or \\pN."""

    start: int
    end: int
    text: str
    name: str


def property_classes(pattern: str) -> list[PropertyClass]:
    """Return the Unicode property classes of `pattern`, skipping escaped backslashes."""
    found = []
    position = 0
    while position < len(pattern) - 1:
        if pattern[position] != "\\":
            position += 1
            continue
        if pattern[position + 1] not in "pP":
            position += 2
            continue
        start = position
        if pattern.startswith("{", position + 2):
            close = pattern.find("}", position + 3)
            end = len(pattern) if close < 0 else close + 1
            name = pattern[position + 3:end - 1 if close >= 0 else end]
        else:
            end = min(position + 3, len(pattern))
            name = pattern[position + 2:end]
        found.append(PropertyClass(start, end, pattern[start:end], name.removeprefix("^")))
        position = end
    return found


# Property names in the form Oniguruma accepts: a general category (L, Lu) or a script or
# property (Greek, Alphabetic). The regex module also accepts Script=Greek, IsGreek, InGreek
# and L&, which Oniguruma rejects.
_ONIGURUMA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_PREFIXED_NAME = re.compile(r"(?:Is|In)(?=[A-Z])")
# The classes of upper-case or lower-case letters, which match nothing of the other case even
# in a case-insensitive Oniguruma expression.
CASED_PROPERTIES = frozenset(
    name.lower() for name in ("Lu", "Ll", "Lt", "LC", "Upper", "Lower", "Uppercase",
                              "Lowercase", "Uppercase_Letter", "Lowercase_Letter",
                              "Titlecase_Letter", "Cased_Letter")
)


def regex_syntax_error(pattern: str) -> str | None:
    """Return why `pattern` is not a valid protected pattern, or None when it compiles.

    Python's re module checks the syntax, because its messages give the position of the fault.
    It has no Unicode property classes (\\p{Lu}), which Oniguruma, the tokenizer's engine, has.
    So each property class is checked on its own, by the `regex` module, and re checks the
    rest of the pattern with a plain letter in the class's place.
    """
    classes = property_classes(pattern)
    for found in classes:
        problem = _property_class_error(found)
        if problem is not None:
            return problem
    checked, origin = _without_property_classes(pattern, classes)
    try:
        with warnings.catch_warnings():
            # re warns about sets such as [[:upper:]], which _engine_difference checks.
            warnings.simplefilter("ignore", FutureWarning)
            compiled = re.compile(checked)
    except re.error as error:
        position = None if error.pos is None else origin[error.pos]
        return regex_error_message(pattern, error, position)
    return _engine_difference(pattern, compiled)


# Python syntax that Oniguruma, with the Ruby syntax that `tokenizers` uses, reads otherwise,
# with what to write instead.
_READ_OTHERWISE = (
    (re.compile(r"(?<!\\)(?:\\\\)*\\N\{"),
     "\\N{...} is a named character in Python but the letters N{...} in the tokenizer's "
     "engine (Oniguruma); write the character itself"),
    (re.compile(r"(?<!\\)(?:\\\\)*\\U"),
     "\\U followed by eight hex digits is a character code in Python but not in the "
     "tokenizer's engine (Oniguruma); write the character itself or \\x{...}"),
    (re.compile(r"(?<!\\)(?:\\\\)*\\Z"),
     "\\Z matches only at the very end in Python, but also before a final newline in the "
     "tokenizer's engine (Oniguruma); write $ (the end of a line there) or \\b"),
)
# The inline flags that Oniguruma, with the Ruby syntax, does not know, with what to write
# instead. Python accepts them, and the tokenizer would then fail with "undefined group option".
_UNKNOWN_FLAGS = {
    "s": "write [\\s\\S] where a character, a newline included, is meant",
    "a": "write [0-9] or [A-Za-z] where only ASCII characters are meant",
    "u": "remove it, because patterns match Unicode without it",
}
# The flag m, which both engines know, with different meanings.
_MULTILINE_FLAG = (
    "the flag m makes ^ and $ match at line ends in Python, but makes . match a newline in the "
    "tokenizer's engine (Oniguruma), where ^ and $ always match at line ends; remove it"
)
_INLINE_FLAGS = re.compile(r"(?<!\\)(?:\\\\)*\(\?([a-zA-Z]*)(?:-([a-zA-Z]+))?[:)]")
# A POSIX class inside a character set, such as [:alpha:] or [:^digit:].
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")


_UNESCAPED_HASH = re.compile(r"(?<!\\)(?:\\\\)*#")


def _engine_difference(pattern: str, compiled: re.Pattern) -> str | None:
    """Return why Oniguruma would read `pattern` otherwise than Python, or None."""
    for construct, problem in _READ_OTHERWISE:
        if construct.search(pattern):
            return problem
    # NB: flags are looked for outside character sets, where `[(?s)]` is four characters.
    for flags in _INLINE_FLAGS.finditer(_outside_sets(pattern)):
        # Turning m off (`(?-m:...)`) leaves the default, which both engines share.
        if "m" in flags.group(1):
            return _MULTILINE_FLAG
        letters = flags.group(1) + (flags.group(2) or "")
        unknown = next((flag for flag in letters if flag in _UNKNOWN_FLAGS), None)
        if unknown is not None:
            return (f"the inline flag {unknown} at position {flags.start(1) - 2} is not a flag "
                    f"of the tokenizer's engine (Oniguruma), which would reject the pattern; "
                    f"{_UNKNOWN_FLAGS[unknown]}")
    if compiled.flags & re.VERBOSE and _UNESCAPED_HASH.search(pattern):
        return ("a # comment in a verbose (?x) pattern would run on past the pattern in the "
                "tokenizer's combined expression; remove the comment, or write \\# for the "
                "character")
    return _set_difference(pattern)


def _outside_sets(pattern: str) -> str:
    """Return `pattern` with every character inside a character set or a (?#...) comment
    replaced by `x`, so that positions stay the same and nothing there reads as syntax."""
    characters = list(pattern)
    position = 0
    in_set = False
    while position < len(pattern):
        character = pattern[position]
        if character == "\\":
            if in_set:
                characters[position:position + 2] = "x" * len(characters[position:position + 2])
            position += 2
            continue
        if not in_set and pattern.startswith("(?#", position):
            # In both engines a comment ends at its first unescaped ), and a [ in it opens no set.
            position += 3
            while position < len(pattern) and pattern[position] != ")":
                end = min(position + (2 if pattern[position] == "\\" else 1), len(pattern))
                characters[position:end] = "x" * (end - position)
                position = end
            position += 1
            continue
        if in_set and character == "[":
            # A POSIX class such as [:alpha:] is a member, and its ] does not end the set.
            posix = _POSIX_CLASS.match(pattern, position)
            if posix is not None:
                characters[position:posix.end()] = "x" * (posix.end() - position)
                position = posix.end()
                continue
        if not in_set and character == "[":
            in_set = True
            position += 1
            # A ] right after [ or [^ is a member, not the end of the set.
            for member in ("^", "]"):
                if pattern.startswith(member, position):
                    characters[position] = "x"
                    position += 1
            continue
        if in_set and character == "]":
            in_set = False
        elif in_set:
            characters[position] = "x"
        position += 1
    return "".join(characters)


def _set_difference(pattern: str) -> str | None:
    """Return why Oniguruma would read a character set of `pattern` otherwise, or None.

    In Oniguruma `&&` in a set is an intersection and `[` opens a nested set, while Python
    reads both as characters. POSIX classes such as [[:upper:]] mean the same in Oniguruma and
    in the regex module, which finds the matches on the Python side; only the syntax check
    runs in re, which reads them as sets.
    """
    position = 0
    in_set = False
    while position < len(pattern):
        character = pattern[position]
        if character == "\\":
            position += 2
            continue
        if not in_set:
            if character == "[":
                in_set = True
                position += 1
                # A ] right after [ or [^ is a member, not the end of the set.
                if pattern.startswith("^", position):
                    position += 1
                if pattern.startswith("]", position):
                    position += 1
                continue
        elif character == "]":
            in_set = False
        elif pattern.startswith("&&", position):
            return (f"&& at position {position} is an intersection of sets in the tokenizer's "
                    "engine (Oniguruma) but two characters in Python; write \\& for the "
                    "character")
        elif character == "[":
            posix = re.match(r"\[:\^?[a-z]+:\]", pattern[position:])
            if posix is None:
                return (f"[ at position {position} opens a nested set in the tokenizer's engine "
                        "(Oniguruma) but is a character in Python; write \\[ for the character")
            position += posix.end()
            continue
        position += 1
    return None


def _property_class_error(found: PropertyClass) -> str | None:
    if not found.text.endswith("}"):
        # Oniguruma reads \pN as the letters pN.
        return (f"{quote_value(found.text)} is a Unicode property class in Python but the "
                f"letters {quote_value(found.text[1:])} in the tokenizer's engine (Oniguruma); "
                f"write \\{found.text[1]}{{{found.name}}}")
    if not _ONIGURUMA_NAME.fullmatch(found.name) or _PREFIXED_NAME.match(found.name):
        # Oniguruma writes a script without a prefix, and a block as In_ and its Unicode
        # name (In_Greek_and_Coptic), which the regex module's short block names can miss.
        bare = found.name.split("=")[-1].removeprefix("Is")
        example = (f"\\p{{{bare}}}" if _ONIGURUMA_NAME.fullmatch(bare)
                   and not bare.startswith("In") else "\\p{Greek}")
        return (f"the Unicode property class {quote_value(found.text)} has a form that the "
                "tokenizer's engine (Oniguruma) does not accept; write the bare name of a "
                f"general category or script, such as \\p{{Lu}} or {example}, or a block as "
                "\\p{In_Basic_Latin}")
    try:
        regex.compile(found.text)
    except regex.error:
        return (f"unknown Unicode property class {quote_value(found.text)}; use a general "
                "category such as \\p{L} (letters), \\p{Lu} (upper-case letters) or \\p{N} "
                "(numbers), or a script such as \\p{Greek}")
    return None


def _without_property_classes(
    pattern: str, classes: list[PropertyClass]
) -> tuple[str, list[int]]:
    """Return `pattern` with each property class replaced by `x`, and for each position of
    the result (and its end) the position in `pattern` it comes from."""
    parts: list[str] = []
    origin: list[int] = []
    position = 0
    for found in classes:
        parts.append(pattern[position:found.start])
        origin.extend(range(position, found.start))
        parts.append("x")
        origin.append(found.start)
        position = found.end
    parts.append(pattern[position:])
    origin.extend(range(position, len(pattern) + 1))
    return "".join(parts), origin


def oniguruma_rejection(pattern: str, error: Exception) -> str:
    """Describe why Oniguruma, the tokenizer's engine, rejects a pattern that re accepts."""
    if property_classes(pattern):
        hint = ("Oniguruma knows general categories and scripts by their bare names, such as "
                "\\p{Lu} or \\p{Greek}, but not every name of Python's regex module")
    else:
        hint = "rewrite it without Python-only syntax such as (?P<name>...)"
    return (f"regular expression {quote_value(pattern)} is valid in Python but the "
            f"tokenizer's engine (Oniguruma) rejects it: {error}; {hint}.")


def capturing_groups(pattern: str) -> int:
    """Return the number of capturing groups in a pattern that regex_syntax_error accepts."""
    checked, _ = _without_property_classes(pattern, property_classes(pattern))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(checked).groups


def has_backreference(pattern: str) -> bool:
    """Return whether `pattern` refers back to a group: by number (\\1), by name, or in a
    conditional such as (?(1)...)."""
    position = 0
    in_set = False
    while position < len(pattern):
        character = pattern[position]
        if character == "\\" and position + 1 < len(pattern):
            following = pattern[position + 1]
            if not in_set and (following in "123456789" or following in "gk"):
                return True
            position += 2
            continue
        if character == "[" and not in_set:
            in_set = True
        elif character == "]" and in_set:
            in_set = False
        elif not in_set and (pattern.startswith("(?P=", position)
                             or re.match(r"\(\?\(\d", pattern[position:])):
            return True
        position += 1
    return False


def regex_error_message(pattern: str, error: re.error, position: int | None = None) -> str:
    """Describe why Python's re module rejects `pattern`: the error, its position and the fix.

    `position` replaces the error's own where re checked a rewritten pattern. The message
    leaves out the pattern itself, which the caller shows once.
    """
    message = error.msg
    position = error.pos if position is None else position
    if position is not None:
        rest = pattern[position:]
        if rest:
            message += (f" at position {position} (counting from 0), where "
                        f"{quote_value(rest[:12])} begins")
        else:
            message += " at the end of the expression"
    fix = next((fix for start, fix in _REGEX_FIXES if error.msg.startswith(start)),
               "fix the expression so that Python's re module compiles it")
    if error.msg.startswith("unbalanced parenthesis"):
        opened = _set_missing_bracket(pattern, position)
        if opened is not None:
            # A ] missing from a set lets the set run on to a later ], so the ( of the next
            # group becomes a set member, and Python reports the group's ) as the fault.
            fix = (f"the character set that starts at position {opened} "
                   f"({quote_value(pattern[opened:opened + 12])}) contains a group or set and "
                   "runs on to a later ]; close the set with ] where it should end, or else remove "
                   "the extra )")
    return f"{message}; {fix}"


def _set_missing_bracket(pattern: str, before: int | None) -> int | None:
    """Return the position of the set `[...]` before `before` that lacks its ], or None.

    Such a set takes in a `(?` or `[` as members, and closing it with ] in front of that member
    makes the pattern compile. A lone `(` in a set is often meant as a character, so it is no
    sign of a missing ].
    """
    position = 0
    end = len(pattern) if before is None else before
    while position < end:
        character = pattern[position]
        if character == "\\":
            position += 2
            continue
        if character != "[":
            position += 1
            continue
        start = position
        position += 1
        # A ] right after [ or [^ is a member, not the end of the set.
        if pattern.startswith("^", position):
            position += 1
        if pattern.startswith("]", position):
            position += 1
        while position < len(pattern) and pattern[position] != "]":
            if pattern[position] == "\\":
                position += 2
                continue
            if pattern[position] == "[" or pattern.startswith("(?", position):
                closed = pattern[:position] + "]" + pattern[position:]
                try:
                    with warnings.catch_warnings():
                        # Python warns about a possible nested set such as [][]; only
                        # whether the pattern compiles matters here.
                        warnings.simplefilter("ignore", FutureWarning)
                        re.compile(closed)
                except re.error:
                    return None
                return start
            position += 1
        position += 1
    return None


class ProtectedPattern(ApiModel):
    """A regular expression whose matches are always kept apart from their neighbours."""

    name: str = Field(
        max_length=63, description="Name of the pattern, used in the evaluation report."
    )
    regex: str = Field(
        description="Regular expression, such as an ICD-10 code pattern, in the syntax of "
        "Python's re module, plus Unicode property classes such as `\\p{Lu}`. Every match is "
        "one pre-token, split from the whitespace before it, so it tokenizes the same in every "
        "context. The expression must also compile in Oniguruma, the engine of the tokenizer, "
        "which finds the matches: avoid Python-only syntax such as `(?P<name>...)`."
    )
    vocabulary_file: DataPath | None = Field(
        default=None,
        description="CSV file whose first column lists known terms of this pattern, such as "
        "ICD-10 codes. Each listed term that matches the pattern gets its own token, on top of "
        "vocabSize. A relative path resolves against the data directory.",
    )
    dotted_form_after: int | None = Field(
        default=None,
        ge=1,
        description="Also add each vocabulary term longer than this many characters with a `.` "
        "inserted after that many characters, for codes written both ways (ICD-10-CM: 3, so "
        "`E119` also adds `E11.9`).",
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        # In a double-quoted YAML string, "\b" is a backspace and "\t" a tab, so the pattern
        # would match those characters instead of a word boundary or a letter.
        control = next((character for character in value
                        if unicodedata.category(character) == "Cc"), None)
        if control is not None:
            raise ValueError(
                f"contains the control character U+{ord(control):04X}, which a double-quoted "
                "YAML string makes of an escape such as \\b; write the pattern in single "
                "quotes ('\\b...') or double each backslash"
            )
        problem = regex_syntax_error(value)
        if problem is not None:
            # The loader's message shows the value before this text.
            raise ValueError(f"invalid regular expression: {problem}")
        # An empty match anywhere, as `\b` or `(?=x)` give, would split text at every match.
        for sample in EMPTY_MATCH_SAMPLES:
            empty = next((match for match in regex.finditer(value, sample)
                          if match.start() == match.end()), None)
            if empty is not None:
                raise ValueError(
                    f"the regular expression matches the empty string (at position "
                    f"{empty.start()} of {sample!r}); require at least one character, "
                    f"{_empty_match_fix(value)}"
                )
        return value


# An empty alternative: `|` at the start or end of the pattern or of a group, or `||`.
_EMPTY_ALTERNATIVE = re.compile(r"^\||(?<!\\)(?:\|$|\|\||\(\||\|\))")


def _empty_match_fix(pattern: str) -> str:
    """Return how to make `pattern` require a character, judged by the construct that most
    likely lets it match nothing."""
    if _EMPTY_ALTERNATIVE.search(_outside_sets(pattern)):
        return "for example by removing the empty alternative that a `|` leaves"
    return "for example by replacing `*` with `+` or dropping a bare `\\b`"


class TokenizerSpec(ApiModel):
    """Desired state of a Tokenizer."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.specialTokens) || "
            "['<|endoftext|>', '<pad>', '<unk>'].all(t, t in self.specialTokens)",
            message="spec.specialTokens must include <|endoftext|>, <pad> and <unk>; add the "
            "missing ones",
            check=lambda spec: set(REQUIRED_SPECIAL_TOKENS) <= set(spec.special_tokens),
            field="specialTokens",
        ),
    )

    corpus_ref: LocalObjectReference = Field(description="The Corpus to train on.")
    model: TokenizerModel = Field(
        default=TokenizerModel.BYTE_LEVEL_BPE, strict=False, description="Tokenization model."
    )
    vocab_size: int = Field(
        default=8000,
        ge=512,
        le=262144,
        description="Vocabulary size: special tokens, the 256 byte tokens, learned merges and "
        "the protected terms seen in the training split. Terms from a pattern's vocabularyFile "
        "come on top.",
    )
    min_frequency: int = Field(
        default=2,
        ge=1,
        description="Minimum count in the training split for a pair to be merged and for a "
        "protected term to get its own token.",
    )
    max_protected_terms: int = Field(
        default=1000,
        ge=0,
        description="Maximum number of protected terms seen in the training split that get "
        "their own token, most frequent first. They count toward vocabSize; no more than half "
        "of vocabSize is used for them, whatever this value.",
    )
    lowercase: bool = Field(
        default=False,
        description="Lowercase text before tokenizing. Special tokens are matched before "
        "lowercasing and stay intact. Protected patterns then match case-insensitively.",
    )
    special_tokens: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=lambda: list(REQUIRED_SPECIAL_TOKENS),
        max_length=256,
        json_schema_extra=SET_LIST_SCHEMA,
        description="Special tokens, each encoded as a single id. Must include `<|endoftext|>` "
        "(end of document, also bos and eos), `<pad>` and `<unk>`. Add `<mask>` for a "
        "PretrainJob with architecture bert, whose masked language modelling needs it.",
    )
    protected_patterns: list[ProtectedPattern] = Field(
        default_factory=list, max_length=64, json_schema_extra=NAMED_LIST_SCHEMA,
        description="Patterns whose matches are never split from context, each with its own "
        "name.",
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Output location.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Compute resources."
    )
    scheduling: Scheduling = Field(
        default_factory=Scheduling,
        description="Node selector, tolerations and priority of the Tokenizer pod.",
    )
    pod_metadata: PodMetadata = Field(
        default_factory=PodMetadata, description="Labels and annotations for the Tokenizer pod."
    )

    @field_validator("special_tokens")
    @classmethod
    def _required_special_tokens(cls, value: list[str]) -> list[str]:
        blank = [index for index, token in enumerate(value) if not token.strip()]
        if blank:
            raise ValueError(
                f"entry {blank[0]} is blank, and a special token needs at least one visible "
                "character; remove the entry or write the token"
            )
        repeated = sorted({token for token in value if value.count(token) > 1})
        if repeated:
            raise ValueError(
                f"{', '.join(map(repr, repeated))} listed more than once; list each token once"
            )
        missing = [token for token in REQUIRED_SPECIAL_TOKENS if token not in value]
        if missing:
            raise ValueError(
                f"{', '.join(map(repr, missing))} missing; add "
                f"{'it' if len(missing) == 1 else 'them'}, because later stages use "
                f"{', '.join(REQUIRED_SPECIAL_TOKENS)} for end of document, padding and unknown "
                "input"
            )
        return value

    @field_validator("protected_patterns")
    @classmethod
    def _unique_pattern_names(cls, value: list[ProtectedPattern]) -> list[ProtectedPattern]:
        names = [pattern.name for pattern in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"protected pattern names {duplicates!r} are used more than once; give each "
                "pattern its own name"
            )
        return value

    @model_validator(mode="after")
    def _check_patterns_together(self) -> TokenizerSpec:
        """Check what each pattern means in the tokenizer's combined, lowercasing expression."""
        problems = []
        groups_before = 0
        for index, pattern in enumerate(self.protected_patterns):
            location = ("protectedPatterns", index, "regex")
            # A negated class, \\P{Lu} or \\p{^Lu}, matches lowercased text as usual.
            cased = [found.text for found in property_classes(pattern.regex)
                     if found.name.lower() in CASED_PROPERTIES
                     and not found.text.startswith("\\P") and "{^" not in found.text]
            if self.lowercase and cased:
                problems.append((location, pattern.regex, (
                    f"uses {', '.join(cased)}, which matches no letter of the lowercased text "
                    "that a tokenizer with lowercase: true sees; use \\p{L}, or set lowercase "
                    "to false")))
            if groups_before and has_backreference(pattern.regex):
                problems.append((location, pattern.regex, (
                    "refers back to a group, but the patterns before it have "
                    f"{groups_before} capturing group{'s' if groups_before > 1 else ''}, which "
                    "renumber its groups in the tokenizer's combined "
                    "expression; make the groups of the earlier patterns non-capturing with "
                    "(?:...), or put this pattern first")))
            groups_before += capturing_groups(pattern.regex)
        if problems:
            raise rule_error(type(self), problems)
        return self

class Tokenizer(Resource):
    """A trained tokenizer and its evaluation report."""

    kind_name: ClassVar[str] = "Tokenizer"
    plural: ClassVar[str] = "tokenizers"
    short_names: ClassVar[tuple[str, ...]] = ("tok",)
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Phase", json_path=".status.phase"),
        PrinterColumn(name="Corpus", json_path=".spec.corpusRef.name"),
        PrinterColumn(name="Vocab", json_path=".spec.vocabSize", type="integer"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    )

    kind: Literal["Tokenizer"] = "Tokenizer"
    spec: TokenizerSpec
    status: StageStatus | None = None

    def references(self) -> dict[str, tuple[str, str]]:
        return {"corpus": ("Corpus", self.spec.corpus_ref.name)}
