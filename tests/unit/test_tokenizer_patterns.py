"""Protected patterns: the example's regexes, the pre-tokenizer they build, vocabulary files."""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lathe.api.tokenizer import ProtectedPattern, TokenizerSpec
from lathe_trainer.stage import StageConfig, StageError
from lathe_trainer.tokenizer import patterns

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "02-tokenizer.yaml"


def example_patterns() -> list[ProtectedPattern]:
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    return [ProtectedPattern.model_validate(item) for item in spec["protectedPatterns"]]


def stage_config(tmp_path: Path, data_dir: Path) -> StageConfig:
    return StageConfig(kind="Tokenizer", name="t", stage_key="k", spec={},
                       output_uri=str(tmp_path), data_dir=str(data_dir))


@pytest.fixture(scope="module")
def matcher() -> patterns.ProtectedMatcher:
    return patterns.ProtectedMatcher(example_patterns(), lowercase=False)


@pytest.fixture(scope="module")
def icd10_sample(data_dir) -> list[str]:
    """500 real ICD-10-CM codes, a fixed random sample of the file, plus the short ones."""
    with (data_dir / "icd10" / "categories.csv").open(encoding="utf-8", newline="") as handle:
        codes = [row[0] for row in csv.reader(handle)]
    return random.Random(0).sample(codes, 500) + ["A00", "I10", "E119", "S52521A"]


def test_icd10_pattern_matches_real_codes(matcher, icd10_sample):
    """Each code, undotted and dotted, is one whole match of the icd10 pattern."""
    for code in icd10_sample:
        forms = [code] + ([f"{code[:3]}.{code[3:]}"] if len(code) > 3 else [])
        for form in forms:
            text = f"Coded as {form}."
            found = list(matcher.finditer(text))
            assert [(m.pattern, m.text) for m in found] == [("icd10", form)]


def test_icd10_pattern_matches_every_code(data_dir):
    """The pattern matches all of each ICD-10-CM code in the file, undotted and dotted."""
    (icd10,) = [pattern for pattern in example_patterns() if pattern.name == "icd10"]
    expression = re.compile(icd10.regex)
    with (data_dir / "icd10" / "categories.csv").open(encoding="utf-8", newline="") as handle:
        codes = [row[0] for row in csv.reader(handle)]
    assert len(codes) > 20_000
    dotted = [f"{code[:3]}.{code[3:]}" for code in codes if len(code) > 3]
    missed = [form for form in codes + dotted if not expression.fullmatch(form)]
    assert missed == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("given 5 mg/kg daily", [("dose", "5 mg/kg")]),
        ("0.5 mg/kg/day for E11.9", [("dose", "0.5 mg/kg/day"), ("icd10", "E11.9")]),
        ("(100 mg/m2)", [("dose", "100 mg/m2")]),
        ("20 mEq and 10 µg", [("dose", "20 mEq"), ("dose", "10 µg")]),
        ("Z79.4, I10; E119", [("icd10", "Z79.4"), ("icd10", "I10"), ("icd10", "E119")]),
        ("XE11.9 and Z79", [("icd10", "Z79")]),  # no word boundary before the first code
        ("E11.9X9Z9", [("icd10", "E11")]),  # too long after the dot: only the category matches
        ("U07.1 and 5 mgs", []),  # U is reserved in ICD-10-CM; `mgs` is not a unit
        # Genetic markers and mutations from the BC5CDR abstracts: no ICD-10-CM code has S
        # or M as its fourth character.
        ("D17S857, D13S314 and I66M", []),
        # NOTE: a mutation with a three-digit position has the shape of a code such as H442A
        # (H44.2A), so the pattern alone cannot tell them apart.
        ("R117H", [("icd10", "R117H")]),
    ],
)
def test_example_patterns_find(matcher, text, expected):
    assert [(m.pattern, m.text) for m in matcher.finditer(text)] == expected


CONTEXTS = ["{}", "x {}", "x  {}", "({})", "{}.", "a\n{}\n", "\t{},"]


@pytest.mark.parametrize("term", ["E11.9", "E119", "I10", "Z79.4", "5 mg/kg"])
def test_pre_tokenizer_isolates_term(matcher, term):
    """The term is one pre-token, without the whitespace before it, in every context."""
    pre_tokenizer = matcher.pre_tokenizer()
    byte_form = patterns.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    (expected, _), = byte_form.pre_tokenize_str(term)
    for context in CONTEXTS:
        text = context.format(term)
        start = text.index(term)
        pieces = pre_tokenizer.pre_tokenize_str(text)
        assert (expected, (start, start + len(term))) in pieces, (text, pieces)


def test_pre_tokenizer_keeps_every_character(matcher):
    text = "  Dx:\tE11.9 (5 mg/kg)\n\n  caf\u00e9 \ufb05 \uff11\u00a0end  "
    pieces = matcher.pre_tokenizer().pre_tokenize_str(text)
    covered = [offsets for _, offsets in pieces]
    assert covered[0][0] == 0
    assert covered[-1][1] == len(text)
    assert all(left[1] == right[0] for left, right in zip(covered, covered[1:]))


def test_lowercase_matches_ignoring_case():
    """A lowercasing tokenizer pre-tokenizes lowercased text, so its patterns ignore case."""
    matcher = patterns.ProtectedMatcher(example_patterns(), lowercase=True)
    pieces = [piece for piece, _ in matcher.pre_tokenizer().pre_tokenize_str("dx e11.9 5 mg/kg")]
    assert pieces == ["dx", "Ġ", "e11.9", "Ġ", "5Ġmg/kg"]


@pytest.mark.parametrize(
    ("term", "after", "expected"),
    [("E119", 3, "E11.9"), ("S52521A", 3, "S52.521A"), ("I10", 3, None), ("E11.9", 3, None),
     ("E119", None, None)],
)
def test_dotted_form(term, after, expected):
    assert patterns.dotted_form(term, after) == expected


def test_vocabulary_file_counts_rejected_rows(tmp_path, data_dir):
    path = tmp_path / "codes.csv"
    path.write_text('E119,"Type 2 diabetes"\nI10,"Hypertension"\n\nnot-a-code,"x"\n')
    icd10 = example_patterns()[0].model_copy(
        update={"vocabulary_file": str(path), "dotted_form_after": 3}
    )
    vocabulary = patterns.load_vocabulary(stage_config(tmp_path, data_dir), 0, icd10, False)
    assert vocabulary.terms == ["E119", "E11.9", "I10"]
    assert vocabulary.rows == 4
    assert vocabulary.rejected == 3  # the blank row, and `not-a-code` in both forms
    assert vocabulary.rejected_examples == ["not-a-code", "not.-a-code"]


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        ("[A-Z", r"invalid regular expression '\[A-Z': unterminated character set at "
         r"position 0 \(counting from 0\), where '\[A-Z' begins; close the set with \]"),
        ("(?P<code>E11)", "Oniguruma"),
    ],
)
def test_compile_rejects_bad_regex(tmp_path, data_dir, regex, message):
    pattern = ProtectedPattern.model_construct(name="p", regex=regex)
    with pytest.raises(StageError, match=rf"spec\.protectedPatterns\[0\]\.regex: .*{message}"):
        patterns.compile_patterns(stage_config(tmp_path, data_dir), [pattern], False)


SPEC = {"corpusRef": {"name": "c"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"protectedPatterns": [{"name": "p", "regex": "E11("}]}, "invalid regular expression"),
        ({"protectedPatterns": [{"name": "p", "regex": "[0-9]*"}]}, "matches the empty string"),
        ({"protectedPatterns": [{"name": "p", "regex": "a"}, {"name": "p", "regex": "b"}]},
         "used more than once"),
        ({"specialTokens": ["<|endoftext|>", "<pad>"]}, "'<unk>' missing; add it"),
        ({"specialTokens": ["<|endoftext|>", "<pad>", "<unk>", "<pad>"]},
         "'<pad>' listed more than once"),
    ],
)
def test_spec_rejects(change, message):
    with pytest.raises(ValidationError, match=message):
        TokenizerSpec.model_validate({**SPEC, **change})


def test_loader_rejects_invalid_regex():
    """`lathe run` rejects the resource file before any stage starts."""
    from lathe.errors import InvalidResourceError
    from lathe.loader import parse_resource

    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["protectedPatterns"][1]["regex"] = r"[0-9]+ ?(mg"
    with pytest.raises(InvalidResourceError, match=r"spec\.protectedPatterns\[1\]\.regex: "
                       r"invalid value '\[0-9\]\+ \?\(mg': invalid regular expression: "):
        parse_resource(document, "02-tokenizer.yaml")


def test_loader_shows_invalid_regex_once():
    """The message shows the pattern once, with the backslashes the YAML file has."""
    from lathe.errors import InvalidResourceError
    from lathe.loader import parse_resource

    document = yaml.safe_load(EXAMPLE.read_text())
    regex = document["spec"]["protectedPatterns"][0]["regex"].replace(r"\b[", r"\b([", 1)
    assert regex.startswith(r"\b([A-TV-Z]")
    document["spec"]["protectedPatterns"][0]["regex"] = regex
    with pytest.raises(InvalidResourceError) as raised:
        parse_resource(document, "02-tokenizer.yaml")
    assert raised.value.field == "spec.protectedPatterns[0].regex"
    assert raised.value.detail == (
        f"invalid value '{regex}': invalid regular expression: missing ), unterminated "
        "subpattern at position 2 (counting from 0), where '([A-TV-Z][0-' begins; close the "
        "group with ), or write \\( to match a literal parenthesis."
    )
    assert str(raised.value).count(regex) == 1
    assert "\\\\" not in str(raised.value)


def test_loader_shows_empty_matching_regex_once():
    from lathe.errors import InvalidResourceError
    from lathe.loader import parse_resource

    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["protectedPatterns"][0]["regex"] = r"\b\d*"
    with pytest.raises(InvalidResourceError) as raised:
        parse_resource(document, "02-tokenizer.yaml")
    assert raised.value.detail.startswith(
        r"invalid value '\b\d*': the regular expression matches the empty string (at "
        "position 0 of 'a'); require at least one character"
    )
    assert str(raised.value).count(r"\b\d*") == 1


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        ("E11)", "unbalanced parenthesis at position 3 (counting from 0), where ')' begins; "
         "remove the extra ), or write \\) to match a literal parenthesis"),
        # A ] missing after AB: the set runs on to the ] of the next set, and takes the (
        # of the group as a character.
        (r"[A-Z][0-9AB(?:\.[0-9])?", r"unbalanced parenthesis at position 21 (counting from "
         r"0), where ')?' begins; the character set that starts at position 5 ('[0-9AB(?:\.[') "
         r"contains a group or set and runs on to a later ]; close the set with ] where it "
         r"should end, or else remove the extra )"),
        # A ( in a set is a character, so it is no sign of a missing ].
        ("[(]E11)", "unbalanced parenthesis at position 6 (counting from 0), where ')' begins; "
         "remove the extra ), or write \\) to match a literal parenthesis"),
        # A set after the extra ), and a closed set that contains [, are not the fault.
        ("a)[(?:]", "unbalanced parenthesis at position 1 (counting from 0), where ')[(?:]' "
         "begins; remove the extra ), or write \\) to match a literal parenthesis"),
        ("[[]E11)", "unbalanced parenthesis at position 6 (counting from 0), where ')' begins; "
         "remove the extra ), or write \\) to match a literal parenthesis"),
        ("E11\\", "bad escape (end of pattern) at position 3 (counting from 0), where '\\' "
         "begins; remove the backslash, or write \\\\ to match a literal backslash"),
        (r"E\q1", r"bad escape \q at position 1 (counting from 0), where '\q1' begins; remove "
         r"the backslash, or write \\ to match a literal backslash"),
        ("*E11", "nothing to repeat at position 0 (counting from 0), where '*E11' begins; put "
         "the character or group to repeat before the quantifier, or escape the quantifier as "
         "\\*, \\+ or \\?"),
        ("(?<=E+)11", "look-behind requires fixed-width pattern; fix the expression so that "
         "Python's re module compiles it"),
    ],
)
def test_regex_error_message(regex, message):
    import re

    from lathe.api.tokenizer import regex_error_message

    with pytest.raises(re.error) as raised:
        re.compile(regex)
    assert regex_error_message(regex, raised.value) == message


@pytest.mark.parametrize(
    ("regex", "problem"),
    [
        (r"\p{Lu}[0-9]+", None),
        (r"[\p{Lu}\d]{2,}", None),
        (r"\P{L}x", None),
        (r"\p{Greek}+", None),
        (r"\p{Foo}[0-9]", r"unknown Unicode property class '\p{Foo}'; use a general category "
         r"such as \p{L} (letters), \p{Lu} (upper-case letters) or \p{N} (numbers), or a script "
         r"such as \p{Greek}"),
        # re checks the rest of the pattern, and positions count in the pattern as written.
        (r"\p{Lu}(", "missing ), unterminated subpattern at position 6 (counting from 0), where "
         "'(' begins; close the group with ), or write \\( to match a literal parenthesis"),
        (r"\p{Lu}\q", r"bad escape \q at position 6 (counting from 0), where '\q' begins; "
         r"remove the backslash, or write \\ to match a literal backslash"),
        # Forms that the regex module accepts and Oniguruma rejects.
        (r"\p{Script=Greek}", r"the Unicode property class '\p{Script=Greek}' has a form that "
         r"the tokenizer's engine (Oniguruma) does not accept; write the bare name of a general "
         r"category or script, such as \p{Lu} or \p{Greek}, or a block as \p{In_Basic_Latin}"),
        (r"\p{IsGreek}+", r"the Unicode property class '\p{IsGreek}' has a form that the "
         r"tokenizer's engine (Oniguruma) does not accept; write the bare name of a general "
         r"category or script, such as \p{Lu} or \p{Greek}, or a block as \p{In_Basic_Latin}"),
        (r"\p{InBasic_Latin}", r"the Unicode property class '\p{InBasic_Latin}' has a form "
         r"that the tokenizer's engine (Oniguruma) does not accept; write the bare name of a "
         r"general category or script, such as \p{Lu} or \p{Greek}, or a block as "
         r"\p{In_Basic_Latin}"),
        (r"\p{Inherited}", None),
        # Python syntax that Oniguruma reads otherwise is rejected, not silently changed.
        (r"\pN+", r"'\pN' is a Unicode property class in Python but the letters 'pN' in the "
         r"tokenizer's engine (Oniguruma); write \p{N}"),
        (r"\w[&&]\w", r"&& at position 3 is an intersection of sets in the tokenizer's engine "
         r"(Oniguruma) but two characters in Python; write \& for the character"),
        (r"[[a]]", r"[ at position 1 opens a nested set in the tokenizer's engine (Oniguruma) "
         r"but is a character in Python; write \[ for the character"),
        (r"[[:upper:]]{2,}", None),
        (r"(?m)a.b", "the flag m makes ^ and $ match at line ends in Python, but makes . match "
         "a newline in the tokenizer's engine (Oniguruma), where ^ and $ always match at line "
         "ends; remove it"),
        (r"(?s)E11.+", r"the inline flag s at position 0 is not a flag of the tokenizer's engine "
         r"(Oniguruma), which would reject the pattern; write [\s\S] where a character, a "
         r"newline included, is meant"),
        (r"E(?i-s:11)", r"the inline flag s at position 1 is not a flag of the tokenizer's "
         r"engine (Oniguruma), which would reject the pattern; write [\s\S] where a "
         r"character, a newline included, is meant"),
        (r"(?a:\w+)", r"the inline flag a at position 0 is not a flag of the tokenizer's engine "
         r"(Oniguruma), which would reject the pattern; write [0-9] or [A-Za-z] where only "
         r"ASCII characters are meant"),
        (r"(?i:e11)\(?s", None),
        # Inside a character set, (?s) and (?m) are characters in both engines.
        (r"[(?s)]E11", None),
        (r"[(?m)]E11", None),
        (r"(?i-m:E11)", None),
        # A [ in a (?#...) comment opens no set, so the flag after the comment counts.
        (r"(?#[)(?s:E11)", r"the inline flag s at position 5 is not a flag of the tokenizer's "
         r"engine (Oniguruma), which would reject the pattern; write [\s\S] where a "
         r"character, a newline included, is meant"),
        # The ] of a POSIX class does not end its set, so the characters of (?s:x) are members.
        (r"[[:alpha:](?s:x)]", None),
        (r"E11\Z", r"\Z matches only at the very end in Python, but also before a final newline "
         r"in the tokenizer's engine (Oniguruma); write $ (the end of a line there) or \b"),
        (r"E11\\Z", None),
        (r"\N{EM DASH}", r"\N{...} is a named character in Python but the letters N{...} in the "
         r"tokenizer's engine (Oniguruma); write the character itself"),
        (r"\U00000041", r"\U followed by eight hex digits is a character code in Python but not "
         r"in the tokenizer's engine (Oniguruma); write the character itself or \x{...}"),
        (r"(?x) E11 # code", r"a # comment in a verbose (?x) pattern would run on past the "
         r"pattern in the tokenizer's combined expression; remove the comment, or write \# for "
         r"the character"),
        (r"(?x) E \# 11", None),
        # An escaped backslash before p is a literal backslash, not a property class.
        (r"\\p{2}", None),
        ("E11(", "missing ), unterminated subpattern at position 3 (counting from 0), where '(' "
         "begins; close the group with ), or write \\( to match a literal parenthesis"),
    ],
)
def test_regex_syntax_error(regex, problem):
    from lathe.api.tokenizer import regex_syntax_error

    assert regex_syntax_error(regex) == problem


def test_property_class_pattern_end_to_end(tmp_path, data_dir):
    """A pattern with \\p{Lu} passes the API and the stage, and Oniguruma finds its matches."""
    spec = TokenizerSpec.model_validate({**SPEC, "protectedPatterns": [
        {"name": "gene", "regex": r"\b\p{Lu}{2,}[0-9]+\b"},
        {"name": "icd10", "regex": r"\b[A-TV-Z][0-9]{2}\.[0-9]\b"},
    ]})
    matcher = patterns.compile_patterns(stage_config(tmp_path, data_dir),
                                        spec.protected_patterns, lowercase=False)
    found = [(m.pattern, m.text) for m in matcher.finditer("MLH1 and ÉCA12 with E11.9 in B12")]
    assert found == [("gene", "MLH1"), ("gene", "ÉCA12"), ("icd10", "E11.9")]


def test_finditer_offsets_count_characters(matcher):
    """Offsets are character positions, also after characters of several UTF-8 bytes."""
    text = "µµ dosed 10 µg for E11.9"
    found = list(matcher.finditer(text))
    assert [(m.pattern, m.text) for m in found] == [("dose", "10 µg"), ("icd10", "E11.9")]
    assert all(text[m.start:m.end] == m.text for m in found)


def test_finditer_gives_match_to_first_pattern():
    """Where two patterns match the same span, the match belongs to the first, in spec order."""
    both = patterns.ProtectedMatcher([
        ProtectedPattern(name="code", regex=r"\b[A-Z][0-9]{2}\b"),
        ProtectedPattern(name="word", regex=r"\b[A-Z][A-Z0-9]+\b"),
    ], lowercase=False)
    found = [(m.pattern, m.text) for m in both.finditer("E11 then ABC and I10")]
    assert found == [("code", "E11"), ("word", "ABC"), ("code", "I10")]


def compiles_in_oniguruma(regex: str) -> bool:
    """Return whether the tokenizer's engine compiles `regex`."""
    try:
        patterns.Regex(regex)
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception
        return False
    return True


@pytest.mark.parametrize("regex", [r"\p{Script=Greek}", r"\p{IsGreek}", r"\p{In_Basic_Latin}",
                                   r"\p{Greek}", r"\p{Inherited}", r"\p{LC}"])
def test_accepted_property_classes_compile_in_oniguruma(regex):
    """What the syntax check accepts, Oniguruma compiles; what it rejects, Oniguruma rejects
    too, apart from In_ blocks, which the regex module does not know."""
    from lathe.api.tokenizer import regex_syntax_error

    accepted = regex_syntax_error(regex) is None
    compiles = compiles_in_oniguruma(regex)
    if accepted:
        assert compiles
    elif regex != r"\p{In_Basic_Latin}":
        assert not compiles


@pytest.mark.parametrize("flag", ["s", "a", "u"])
def test_unknown_flags_rejected_by_oniguruma(flag):
    """The inline flags that the syntax check rejects as unknown, Oniguruma rejects too, and
    the flags it accepts compile there."""
    from lathe.api.tokenizer import regex_syntax_error

    assert regex_syntax_error(f"(?{flag}:E11)") is not None
    with pytest.raises(Exception, match="undefined group option"):
        patterns.Regex(f"(?{flag}:E11)")
    for accepted in ("i", "x", "ix"):
        assert regex_syntax_error(f"(?{accepted}:E11)") is None
        patterns.Regex(f"(?{accepted}:E11)")


@pytest.mark.parametrize("regex", [r"(?#[)(?s:E11)", r"(?#\)[)(?s:E11)", r"(?#[)E11",
                                   r"[[:alpha:](?s:x)]", r"[[:^digit:]a](?s:x)"])
def test_flag_check_matches_oniguruma(regex):
    """The syntax check accepts a pattern with a comment or a POSIX class exactly when
    Oniguruma compiles it."""
    from lathe.api.tokenizer import regex_syntax_error

    assert (regex_syntax_error(regex) is None) == compiles_in_oniguruma(regex)


def test_lowercase_rejects_cased_property_class():
    with pytest.raises(ValidationError, match=r"protectedPatterns\.0\.regex\n.*uses \\p\{Lu\}, "
                       r"which matches no letter of the lowercased text"):
        TokenizerSpec.model_validate({**SPEC, "lowercase": True, "protectedPatterns": [
            {"name": "gene", "regex": r"\b\p{Lu}{2,}[0-9]+\b"}]})


def test_backreference_after_capturing_groups_rejected():
    """Combining the patterns renumbers the groups of a later one, so its \\1 would refer to
    another pattern's group."""
    spec = {**SPEC, "protectedPatterns": [{"name": "a", "regex": r"\b(x)y\b"},
                                          {"name": "b", "regex": r"\b([A-Z])\1[0-9]+\b"}]}
    with pytest.raises(ValidationError, match=r"protectedPatterns\.1\.regex\n.*patterns before "
                       r"it have 1 capturing group, which renumber"):
        TokenizerSpec.model_validate(spec)
    spec["protectedPatterns"][0]["regex"] = r"\b(?:x)y\b"
    TokenizerSpec.model_validate(spec)


def test_backreference_works_when_groups_keep_numbers():
    matcher = patterns.ProtectedMatcher([
        ProtectedPattern(name="a", regex=r"\b(?:x)y\b"),
        ProtectedPattern(name="b", regex=r"\b([A-Z])\1[0-9]+\b"),
    ], lowercase=False)
    found = [(m.pattern, m.text) for m in matcher.finditer("AA12 and AB3 and BB7")]
    assert found == [("b", "AA12"), ("b", "BB7")]


def test_lowercase_matches_as_tokenizer():
    """With lowercase, matches are found as the tokenizer finds them: ignoring case, on the
    lowercased text, with offsets and texts of the original."""
    matcher = patterns.ProtectedMatcher(example_patterns(), lowercase=True)
    text = "Serum at 1.58 mmol/L and e11.9, then İE11.9"
    found = [(m.pattern, m.start, m.end, m.text) for m in matcher.finditer(text)]
    assert found[0] == ("dose", 9, 20, "1.58 mmol/L")
    assert found[1] == ("icd10", 25, 30, "e11.9")
    # İ lowercases to two characters, so the offsets after it are mapped back.
    assert [m.text for m in matcher.finditer("İ E11.9")] == ["E11.9"]
    assert all(text[start:end] == match for _, start, end, match in found)


def test_lowercase_accepts_negated_cased_class():
    """\\P{Lu} matches lowercased text as usual, so it stays allowed with lowercase."""
    TokenizerSpec.model_validate({**SPEC, "lowercase": True, "protectedPatterns": [
        {"name": "word", "regex": r"\b\P{Lu}{3}[0-9]\b"}]})


def test_conditional_group_reference_rejected():
    spec = {**SPEC, "protectedPatterns": [{"name": "a", "regex": r"\b(a)x\b"},
                                          {"name": "b", "regex": r"(b)?(?(1)c|d)x"}]}
    with pytest.raises(ValidationError, match="refers back to a group"):
        TokenizerSpec.model_validate(spec)


@pytest.mark.parametrize(("regexes", "text", "expected"), [
    # The second pattern cannot match at 1 without a word boundary there, so the match of
    # the combined expression there is the third's.
    ([r"x", r"\bab\b", r"xa|ab"], "xab", [("p0", "x"), ("p2", "ab")]),
    # The third pattern's own search would consume "xa" first; at 1 the second matches.
    ([r"q", r"xa|ab", r"ab"], "xab", [("p1", "xa")]),
    ([r"[0-9]+", r"[A-Z][0-9]+"], "E11 and 42", [("p1", "E11"), ("p0", "42")]),
])
def test_finditer_credits_pattern_matching_at_start(regexes, text, expected):
    matcher = patterns.ProtectedMatcher(
        [ProtectedPattern(name=f"p{index}", regex=value) for index, value in enumerate(regexes)],
        lowercase=False)
    assert [(m.pattern, m.text) for m in matcher.finditer(text)] == expected


def test_lowercase_counts_terms_as_tokenizer_lowercases():
    """Σ lowercases to σ character by character, as the tokenizer's normalizer does, and
    not to the final ς that Python's str.lower gives at a word's end."""
    from lathe_trainer.tokenizer import training

    matcher = patterns.ProtectedMatcher(
        [ProtectedPattern(name="greek", regex=r"\b\p{Greek}{4}\b")], lowercase=True)
    counts = training.count_protected_terms(["ΟΔΟΣ and οδοσ"], matcher, lowercase=True)
    assert counts == {"οδοσ": 2}


def test_verbose_comment_rejected_by_stage(tmp_path, data_dir):
    """A # comment of a (?x) pattern would swallow the rest of the combined expression, so
    the stage rejects it, naming the pattern, before building the tokenizer."""
    pattern = ProtectedPattern.model_construct(name="b", regex="(?x) E12 # comment")
    with pytest.raises(StageError, match=r"spec\.protectedPatterns\[0\]\.regex: .*a # comment "
                       r"in a verbose \(\?x\) pattern"):
        patterns.compile_patterns(stage_config(tmp_path, data_dir), [pattern], False)
