"""A reference to a resource in another namespace gets an error that names where it is defined."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe import loader
from lathe.errors import InvalidResourceError
from lathe.graph import order

CORPUS = """\
apiVersion: lathe.dev/v1alpha1
kind: Corpus
metadata: {name: pubmed}
spec:
  sources:
  - {name: notes, format: text, path: notes.txt}
"""

TOKENIZER = """\
apiVersion: lathe.dev/v1alpha1
kind: Tokenizer
metadata: {name: tok, namespace: team-a}
spec:
  corpusRef: {name: pubmed}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reference_in_other_namespace_explained(tmp_path):
    corpus = write(tmp_path, "corpus.yaml", CORPUS)
    tokenizer = write(tmp_path, "tokenizer.yaml", TOKENIZER)
    with pytest.raises(InvalidResourceError) as raised:
        order(loader.load_paths([tmp_path]))
    error = raised.value
    assert error.field == "spec.corpusRef.name"
    assert "Tokenizer/team-a/tok" in error.resource
    assert str(tokenizer) in error.resource
    assert "only within" in error.detail
    assert "Corpus/default/pubmed" in error.detail
    assert str(corpus) in error.detail
    assert "not defined in the files given" not in error.detail


def test_reference_in_same_namespace_resolves(tmp_path):
    write(tmp_path, "corpus.yaml", CORPUS.replace("{name: pubmed}",
                                                  "{name: pubmed, namespace: team-a}"))
    write(tmp_path, "tokenizer.yaml", TOKENIZER)
    resources = order(loader.load_paths([tmp_path]))
    assert [resource.key for resource in resources] == [
        "Corpus/team-a/pubmed", "Tokenizer/team-a/tok"]


def test_missing_reference_still_not_defined(tmp_path):
    write(tmp_path, "corpus.yaml", CORPUS.replace("name: pubmed", "name: other"))
    write(tmp_path, "tokenizer.yaml", TOKENIZER)
    with pytest.raises(InvalidResourceError, match="not defined in the files given"):
        order(loader.load_paths([tmp_path]))
