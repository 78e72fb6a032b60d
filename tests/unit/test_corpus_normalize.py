"""Normalization changes Unicode form and whitespace, never codes or numbers."""

from __future__ import annotations

import pytest

from lathe_trainer.corpus.normalize import normalize_text, word_count


@pytest.mark.parametrize(
    "text",
    [
        "Type 2 diabetes mellitus (E11.9) and E119 in the claim.",
        "Naloxone 5 mg/kg i.v., then 0.2 to 2 mg/kg.",
        "HbA1c 7.2%, creatinine 1.10 mg/dL, LDL 096 mg/dL.",
        "Codes I10, Z79.4, M1A.04 and T82.0; p < 0.05; 10(-8) M.",
        "Dose 1,250 mcg (1.25 mg) on 2019-05-01.",
    ],
)
@pytest.mark.parametrize("form", ["NFC", "NFKC", "none"])
def test_codes_and_numbers_are_unchanged(text, form):
    assert normalize_text(text, form) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a  b\t\tc", "a b c"),
        ("  indented line  \nnext", "indented line\nnext"),
        ("no-break\u00a0space and\u3000ideographic", "no-break space and ideographic"),
        ("windows\r\nline\rends", "windows\nline\nends"),
        ("para one\n\n\n\npara two", "para one\n\npara two"),
        ("\n\n  padded document  \n", "padded document"),
    ],
)
def test_whitespace_is_collapsed(text, expected):
    assert normalize_text(text) == expected


def test_whitespace_kept_when_collapse_is_off():
    assert normalize_text("a  b\n    c", collapse_whitespace=False) == "a  b\n    c"


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("NFC", "café \ufb05 \uff11\uff12 5 \u00b5g"),
        # NFKC folds compatibility characters, the micro sign into the Greek letter mu included.
        ("NFKC", "café st 12 5 \u03bcg"),
        ("none", "cafe\u0301 \ufb05 \uff11\uff12 5 \u00b5g"),
    ],
)
def test_unicode_form_is_applied(form, expected):
    assert normalize_text("cafe\u0301 \ufb05 \uff11\uff12 5 \u00b5g", form) == expected


def test_word_count_splits_on_whitespace():
    assert word_count("E11.9 and 5 mg/kg\nnext line") == 6
