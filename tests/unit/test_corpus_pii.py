"""PII redaction: structured identifiers go, codes, doses, years, PMIDs and p-values stay."""

from __future__ import annotations

import pytest

from lathe_trainer.corpus.pii import redact

ALL_KINDS = ["email", "phone", "ssn", "mrn"]


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Contact jane.doe@example.org today.", "Contact <EMAIL> today.", "email"),
        ("Reply to J_Smith+lab@mail.hospital.co.uk", "Reply to <EMAIL>", "email"),
        ("Call (555) 123-4567.", "Call <PHONE>.", "phone"),
        ("Call 555-123-4567 after 5 pm.", "Call <PHONE> after 5 pm.", "phone"),
        ("Pager 555.123.4567", "Pager <PHONE>", "phone"),
        ("Tel +1 555 123 4567", "Tel <PHONE>", "phone"),
        ("Tel: 1-800-555-0199", "Tel: <PHONE>", "phone"),
        ("SSN 123-45-6789 on file", "SSN <SSN> on file", "ssn"),
        ("social security number: 123456789", "social security number: <SSN>", "ssn"),
        ("MRN: 1234567", "MRN: <MRN>", "mrn"),
        ("MRN 00123456", "MRN <MRN>", "mrn"),
        ("MR# 445566, seen today", "MR# <MRN>, seen today", "mrn"),
        ("Medical record number: 99887766", "Medical record number: <MRN>", "mrn"),
    ],
)
def test_identifier_is_redacted(text, expected, kind):
    redacted, counts = redact(text, ALL_KINDS)
    assert redacted == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Type 2 diabetes (E11.9) with hypertension (I10) and insulin use (Z79.4).",
        "Clonidine 5 mg/kg, then 0.2 to 2 mg/kg of naloxone.",
        "Patients treated between 1998 and 2005 (1998-2005) were included.",
        "See PMID 12345678 and PMID: 9949209 for the original reports.",
        "The difference was significant (p = 0.001; p<0.05; P=.002).",
        "Binding at 10(-8) to 10(-5) M of [3H]-naloxone (8 nM).",
        "The locus maps to 2p13-p16 and CFA10q26.",
        "Blood pressure 120/80 mmHg, heart rate 72, temperature 37.2 C.",
        "Registered as NCT01234567; OMIM:215600; MeSH D009270.",
        "Odds ratio 1.8 (95% CI 1.2-3.4), n = 250 310 1200 in the three arms.",
        "Published in 2003-10-1234 issue, ISBN 978-3-16-148410-0, doi:10.1000/182.",
        "Counts of 123-45 and 12-34-5678 cells; version 1.2.3.",
        "Mutations at positions 000-12-3456 and 666-12-3456 were not found.",
        "mail the group at user@localhost",
    ],
)
def test_domain_text_is_not_redacted(text):
    redacted, counts = redact(text, ALL_KINDS)
    assert redacted == text
    assert counts == {}


def test_counts_every_kind():
    text = (
        "Patient MRN: 1234567, SSN 123-45-6789, phone (555) 123-4567 or 555-987-6543, "
        "e-mail a.b@example.com."
    )
    redacted, counts = redact(text, ALL_KINDS)
    assert counts == {"mrn": 1, "ssn": 1, "phone": 2, "email": 1}
    assert "1234567" not in redacted
    assert "6789" not in redacted


def test_only_requested_kinds_are_redacted():
    text = "Write to a.b@example.com or call 555-123-4567."
    redacted, counts = redact(text, ["phone"])
    assert redacted == "Write to a.b@example.com or call <PHONE>."
    assert counts == {"phone": 1}


def test_data_card_ignores_redact_order():
    """The data card names the redacted kinds in one order, so reordering spec.pii.redact
    leaves the Corpus output, and the stages after it, unchanged."""
    from lathe.api.corpus import CorpusSpec
    from lathe_trainer.corpus import datacard
    from lathe_trainer.corpus.stats import CorpusStats

    stats = CorpusStats().to_json()
    stats["splits"] = {"train": {"documents": 0}, "validation": {"documents": 0}}

    def card(kinds: list[str]) -> str:
        spec = CorpusSpec.model_validate({
            "sources": [{"name": "notes", "format": "text", "path": "notes.txt"}],
            "pii": {"redact": kinds},
        })
        return datacard.render("notes", spec.model_dump(mode="json", by_alias=True), stats)

    assert card(["mrn", "ssn", "phone", "email"]) == card(ALL_KINDS)
    assert "PII redacted (email, phone, ssn, mrn)" in card(["mrn", "ssn", "phone", "email"])
