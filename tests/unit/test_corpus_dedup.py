"""Exact and near-duplicate removal: templates and codes are content, near copies are not."""

from __future__ import annotations

import csv
import itertools
import random
import re

import pytest

from lathe_trainer.corpus.dedup import jaccard, remove_exact_duplicates, remove_near_duplicates
from lathe_trainer.corpus.readers import read_pubtator
from lathe_trainer.corpus.records import Document
from lathe_trainer.corpus.shingles import word_ngrams, word_tokens

BOILERPLATE = {
    "header": "DISCHARGE SUMMARY\nGeneral Medicine Service, University Hospital.",
    "history": "HISTORY OF PRESENT ILLNESS:\nThe patient presented to the emergency department "
    "and was evaluated by the admitting team. The history was obtained from the patient and "
    "from the available medical records.",
    "course": "HOSPITAL COURSE:\nThe patient was admitted to the medicine service for further "
    "evaluation and management. Vital signs were monitored every four hours and the patient "
    "received standard care according to the unit protocol.",
    "instructions": "DISCHARGE INSTRUCTIONS:\nFollow up with your primary care physician within "
    "one to two weeks. Return to the emergency department if you develop chest pain, shortness "
    "of breath, fever or any other concerning symptoms. Take all medications as prescribed and "
    "do not stop any medication without talking to your doctor. Bring this summary to your "
    "next appointment.",
}

COMPLAINTS = [
    "worsening dyspnea on exertion", "substernal chest pain radiating to the left arm",
    "fever and productive cough", "syncope while standing", "acute confusion",
    "abdominal pain and vomiting", "a fall at home with right hip pain", "palpitations",
    "new weakness of the left arm", "hematemesis", "polyuria and polydipsia",
    "swelling of both legs", "severe headache with neck stiffness", "jaundice and pruritus",
]
FINDINGS = [
    "Chest radiograph showed {side} lower lobe consolidation.",
    "Echocardiogram revealed an ejection fraction of {pct}% with {grade} mitral regurgitation.",
    "Hemoglobin was {hb} g/dL and creatinine {cr} mg/dL on admission.",
    "CT of the head showed no acute intracranial abnormality.",
    "Troponin peaked at {trop} ng/mL and the ECG showed {ecg}.",
    "Blood cultures grew {organism} sensitive to {drug}.",
    "HbA1c was {a1c}% and fasting glucose {glucose} mg/dL.",
    "Ultrasound showed a {size} cm gallstone without ductal dilatation.",
    "Potassium was {k} mmol/L and was repleted orally.",
    "Lumbar puncture showed {cells} white cells per microliter.",
    "D-dimer was {dd} ng/mL and CT angiography showed a {side} segmental embolus.",
    "Endoscopy found a {size} cm gastric ulcer that was treated with clips.",
]
MEDICATIONS = [
    "metformin {n}00 mg twice daily", "lisinopril {n} mg daily", "furosemide {n}0 mg daily",
    "apixaban 5 mg twice daily", "atorvastatin {n}0 mg at night", "amoxicillin 500 mg three "
    "times daily for {n} days", "insulin glargine {n}0 units at bedtime", "metoprolol {n}5 mg "
    "twice daily", "pantoprazole 40 mg daily", "prednisone {n}0 mg daily with a taper",
]


def _icd10_codes(data_dir) -> list[str]:
    """Real ICD-10-CM codes, written with the dot as in clinical text (E119 -> E11.9)."""
    with (data_dir / "icd10" / "categories.csv").open(encoding="utf-8") as handle:
        codes = [row[0] for row in csv.reader(handle) if len(row[0]) >= 4]
    return [f"{code[:3]}.{code[3:]}" for code in codes]


def _fill(template: str, rng: random.Random) -> str:
    values = {
        "side": rng.choice(["left", "right", "bilateral"]), "pct": rng.randint(15, 70),
        "grade": rng.choice(["mild", "moderate", "severe"]), "hb": round(rng.uniform(6, 16), 1),
        "cr": round(rng.uniform(0.5, 6), 1), "trop": round(rng.uniform(0.01, 40), 2),
        "ecg": rng.choice(["ST elevation in V2-V4", "atrial fibrillation", "sinus tachycardia"]),
        "organism": rng.choice(["Escherichia coli", "Staphylococcus aureus", "Klebsiella"]),
        "drug": rng.choice(["ceftriaxone", "cefazolin", "meropenem"]),
        "a1c": round(rng.uniform(5, 14), 1), "glucose": rng.randint(70, 400),
        "size": round(rng.uniform(0.5, 4), 1), "k": round(rng.uniform(2.5, 6.5), 1),
        "cells": rng.randint(0, 3000), "dd": rng.randint(200, 9000), "n": rng.randint(1, 9),
    }
    return template.format(**values)


def discharge_summary(rng: random.Random, codes: list[str]) -> str:
    """A discharge summary of the shared template with its own findings, codes and drugs."""
    findings = " ".join(_fill(item, rng) for item in rng.sample(FINDINGS, 3))
    diagnoses = ", ".join(rng.sample(codes, 3))
    medications = "; ".join(_fill(item, rng) for item in rng.sample(MEDICATIONS, 3))
    return "\n".join([
        BOILERPLATE["header"],
        f"Admission date: 2023-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.",
        BOILERPLATE["history"],
        f"The patient is a {rng.randint(20, 95)}-year-old with {rng.choice(COMPLAINTS)}.",
        BOILERPLATE["course"],
        f"FINDINGS:\n{findings}",
        f"DIAGNOSES:\n{diagnoses}",
        f"DISCHARGE MEDICATIONS:\n{medications}",
        BOILERPLATE["instructions"],
    ])


def _documents(texts: list[str], source: str = "test") -> list[Document]:
    return [Document(f"{source}:{i}", source, str(i), text) for i, text in enumerate(texts)]


def _change_one_word(text: str, position: int, replacement: str = "unremarkable") -> str:
    words = text.split(" ")
    words[position] = replacement
    return " ".join(words)


@pytest.fixture(scope="module")
def summaries(data_dir) -> list[str]:
    rng = random.Random(23)
    codes = _icd10_codes(data_dir)
    return [discharge_summary(rng, codes) for _ in range(200)]


def test_template_dominates_each_summary(summaries):
    """The case is only meaningful when the shared template is most of every document."""
    template_words = sum(len(part.split()) for part in BOILERPLATE.values())
    for text in summaries:
        assert template_words / len(text.split()) > 0.5


def test_templated_summaries_are_not_near_duplicates(summaries):
    result = remove_near_duplicates(_documents(summaries))
    assert len(result.kept) == 200
    assert result.removed == []


def test_templated_summaries_stay_below_threshold(summaries):
    """Every pair stays clearly below 0.8, not just below it by MinHash chance."""
    shingles = [word_ngrams(word_tokens(text), 5) for text in summaries]
    highest = max(jaccard(a, b) for a, b in itertools.combinations(shingles, 2))
    assert highest < 0.7


def test_summary_with_one_word_changed_is_near_duplicate(summaries):
    copies = [_change_one_word(text, 30 + i) for i, text in enumerate(summaries[:20])]
    documents = _documents(summaries + copies)
    result = remove_near_duplicates(documents)
    assert len(result.kept) == 200
    removed = {item.id: kept.id for item, kept in result.removed}
    assert removed == {f"test:{200 + i}": f"test:{i}" for i in range(20)}


@pytest.fixture(scope="module")
def abstracts(data_dir) -> list[str]:
    path = data_dir / "pubmed" / "bc5cdr" / "CDR_TrainingSet.PubTator.txt"
    return [document.text for document in read_pubtator(path, "bc5cdr").documents[:100]]


def test_abstract_with_one_word_changed_is_near_duplicate(abstracts):
    copies = [_change_one_word(text, 12) for text in abstracts[:25]]
    result = remove_near_duplicates(_documents(abstracts + copies))
    assert [document.id for document in result.kept] == [f"test:{i}" for i in range(100)]
    assert len(result.removed) == 25


NOTE = (
    "Follow-up visit. Diagnoses: {c1} and {c2}, with {c3} noted at the last visit. Labs today: "
    "HbA1c {a1c}%, creatinine {cr} mg/dL, potassium {k} mmol/L, LDL {ldl} mg/dL. Continue "
    "metformin and lisinopril, recheck labs in three months."
)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(
            dict(c1="E11.9", c2="I10", c3="Z79.4", a1c="7.2", cr="1.1", k="4.2", ldl="96"),
            dict(c1="E13.8", c2="I11", c3="Z79.8", a1c="7.2", cr="1.1", k="4.2", ldl="96"),
            id="icd10-codes",
        ),
        pytest.param(
            dict(c1="E11.9", c2="I10", c3="Z79.4", a1c="7.2", cr="1.1", k="4.2", ldl="96"),
            dict(c1="E11.9", c2="I10", c3="Z79.4", a1c="9.8", cr="2.4", k="5.9", ldl="61"),
            id="lab-values",
        ),
    ],
)
def test_notes_differing_in_codes_are_kept(first, second):
    texts = [NOTE.format(**first), NOTE.format(**second)]
    result = remove_near_duplicates(_documents(texts))
    assert len(result.kept) == 2
    # The same notes with every number mapped to 0 would be merged: the test can fail.
    masked = [word_ngrams(word_tokens(re.sub(r"\d+", "0", text)), 5) for text in texts]
    assert jaccard(*masked) >= 0.8


def test_near_duplicate_choice_is_deterministic(abstracts):
    copies = [_change_one_word(text, 5) for text in abstracts[:10]]
    documents = _documents(copies + abstracts[:10])
    first = remove_near_duplicates(documents)
    second = remove_near_duplicates(documents)
    assert [d.id for d in first.kept] == [d.id for d in second.kept]
    # The earlier document in input order is the one kept.
    assert [d.id for d in first.kept] == [f"test:{i}" for i in range(10)]


def test_exact_duplicates_keep_first_occurrence():
    documents = _documents(["alpha beta", "gamma delta", "alpha beta", "alpha beta"])
    result = remove_exact_duplicates(documents)
    assert [d.id for d in result.kept] == ["test:0", "test:1"]
    assert [(d.id, kept.id) for d, kept in result.removed] == [
        ("test:2", "test:0"), ("test:3", "test:0"),
    ]


def test_document_without_words_is_kept():
    result = remove_near_duplicates(_documents(["...", "---", "a real sentence of words"]))
    assert len(result.kept) == 3
