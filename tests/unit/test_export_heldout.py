"""Held-out sentences of the export checks, read from CoNLL files as FineTune reads them."""

from __future__ import annotations

import re

import pytest

from lathe_trainer.export.heldout import read_held_out


def test_conll2003_layout_and_docstart(tmp_path):
    """Middle columns are ignored, and `-DOCSTART-` lines are neither text nor sentences."""
    path = tmp_path / "held_out.tsv"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "Ataxia\tNN\tB-NP\tB-Disease\n-\t:\tI-NP\tI-Disease\nis\tVBZ\tB-VP\tO\n\n"
        "-DOCSTART-\tO\n"
        "IL\tNN\tB-NP\tO\n"
    )
    sentences = read_held_out(path, limit=10)
    assert [sentence.text for sentence in sentences] == ["Ataxia - is", "IL"]
    assert sentences[0].gold == [
        {"start": 0, "end": 8, "text": "Ataxia -", "label": "Disease"},
    ]
    assert sentences[1].gold == []


def test_malformed_line_raises(tmp_path):
    path = tmp_path / "held_out.tsv"
    path.write_text("Ataxia\tB-Disease\nis\n")
    expected = f"{path}:2: expected `token<TAB>tag` or `token tag`, got 'is'"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        read_held_out(path, limit=10)
