"""Redaction of structured personal identifiers, after decontamination and before the split.

Only identifiers with a recognizable structure are redacted: e-mail addresses, North American
phone numbers written with separators, US Social Security numbers, and medical record numbers
introduced by their label (`MRN`, `MR#`, `medical record number`). Each is replaced with a
placeholder (`<EMAIL>`, `<PHONE>`, `<SSN>`, `<MRN>`); the label of an MRN stays. A bare run of
digits is never redacted, because in biomedical text it is far more often a PMID, a year, a
count or a dose than an identifier.

NOTE: names, addresses and dates of birth need a trained recognizer and are not redacted.
"""

from __future__ import annotations

import re
from collections import Counter

# No digit, dot, dash or word character may touch a match on either side: that keeps p-values,
# ranges (`120-130`), decimals and accession numbers from matching part of the pattern.
_EDGE_BEFORE = r"(?<![\w.\-+/])"
_EDGE_AFTER = r"(?![\w\-/]|\.\d)"

PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(
        r"(?<![\w.%+\-])[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+"
        r"[A-Za-z]{2,}\b"
    ),
    # `MRN: 1234567`, `MRN 00123456`, `MR#445566`, `Medical record number: 99887766`. The
    # label group is kept in the output; only the number is replaced.
    "mrn": re.compile(
        r"(?P<label>\b(?:MRN|MR\s?#|medical\s+record\s+(?:number|no\.?|#))\s*(?:[:#]\s*)?)"
        r"(?P<value>\d{5,12})\b",
        re.IGNORECASE,
    ),
    # 123-45-6789 (area 000, 666 and 9xx, group 00 and serial 0000 are never issued), or a
    # labelled 9-digit number (`SSN: 123456789`).
    "ssn": re.compile(
        _EDGE_BEFORE + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _EDGE_AFTER
        + r"|(?P<label>\b(?:SSN|social\s+security\s+(?:number|no\.?))\s*(?:[:#]\s*)?)"
        r"(?P<value>\d{9})\b",
        re.IGNORECASE,
    ),
    # (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-0199 and +1 555 123 4567. The
    # area code starts with 2-9, as in the North American Numbering Plan. Three groups
    # separated only by spaces count only after +1, because flattened tables are full of
    # such triples.
    "phone": re.compile(
        r"(?:(?<![\w+])\+1[\s.\-]?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[\s.\-])\d{3}[\s.\-]\d{4}"
        r"|" + _EDGE_BEFORE + r"(?:1[.\-]?)?\([2-9]\d{2}\)\s?\d{3}[\s.\-]\d{4}"
        r"|" + _EDGE_BEFORE + r"(?:1[.\-])?[2-9]\d{2}(?P<separator>[.\-])\d{3}(?P=separator)\d{4})"
        + _EDGE_AFTER
    ),
}

PLACEHOLDERS = {kind: f"<{kind.upper()}>" for kind in PATTERNS}

# Cheap patterns that every match of a kind contains. The full patterns start with lookbehinds
# and alternations, which keep the regex engine from skipping ahead, so a document is scanned
# with them only after its hint matched. On the 1,500 BC5CDR abstracts this cut redaction from
# 0.8 s to 0.35 s (measured with time.perf_counter on one core of a shared 2-core machine).
HINTS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"@"),
    "mrn": re.compile(r"MR|medical\s+record", re.IGNORECASE),
    "ssn": re.compile(r"\d{3}-\d{2}-\d{4}|SSN|social\s+security", re.IGNORECASE),
    "phone": re.compile(r"\d{3}[\s.\-]\d{4}"),
}


def redact(text: str, kinds: list[str]) -> tuple[str, Counter[str]]:
    """Return text with the identifiers of the given kinds replaced, and counts per kind.

    Kinds apply in a fixed order (e-mail, MRN, SSN, phone), whatever the order of `kinds`, so
    that digits inside an e-mail address or a labelled MRN are not also read as a phone number.
    """
    counts: Counter[str] = Counter()
    for kind, pattern in PATTERNS.items():
        if kind not in kinds or not HINTS[kind].search(text):
            continue
        text, replaced = pattern.subn(lambda match: _placeholder(kind, match), text)
        if replaced:
            counts[kind] += replaced
    return text, counts


def _placeholder(kind: str, match: re.Match[str]) -> str:
    label = match.groupdict().get("label")
    return (label or "") + PLACEHOLDERS[kind]
