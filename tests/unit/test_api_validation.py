"""`lathe validate` rejects what the API server would reject, with the field, value and fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lathe import loader
from lathe.errors import InvalidResourceError

SPECS: dict[str, dict[str, Any]] = {
    "Corpus": {"sources": [{"name": "ncbi", "format": "ncbiDisease", "path": "a.txt"}]},
    "Tokenizer": {"corpusRef": {"name": "pubmed"}},
    "PretrainJob": {"corpusRef": {"name": "pubmed"}, "tokenizerRef": {"name": "pubmed"}},
    "FineTune": {
        "baseModel": {"pretrainJobRef": {"name": "lm"}},
        "data": {"train": "train.tsv", "test": "test.tsv"},
    },
    "ModelDeployment": {"model": {"fineTuneRef": {"name": "ner"}}},
}


def document(kind: str, spec: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "test", **metadata},
        "spec": copy.deepcopy(SPECS[kind]) if spec is None else spec,
    }


def rejection(body: dict[str, Any]) -> InvalidResourceError:
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(body, "resource.yaml")
    return raised.value


NAME_RULE = ("lowercase letters, digits and '-', starting and ending with a letter or digit, "
             "at most 63 characters")


@pytest.mark.parametrize("name", ["PubMed", "-pubmed", "pub.med", "a" * 64, ""])
def test_invalid_name_explained(name):
    error = rejection(document("Corpus", name=name))
    assert error.field == "metadata.name"
    assert NAME_RULE in error.detail
    assert repr(name) in error.detail
    assert "[a-z0-9]" not in error.detail


@pytest.mark.parametrize("namespace", ["../../escaped", "Team-A", "team_a", "a" * 64, ""])
def test_invalid_namespace_rejected(namespace):
    error = rejection(document("Corpus", namespace=namespace))
    assert error.field == "metadata.namespace"
    assert NAME_RULE in error.detail
    assert repr(namespace) in error.detail


def test_valid_namespace_accepted():
    resource = loader.parse_resource(document("Corpus", namespace="team-a"), "resource.yaml")
    assert resource.metadata.namespace == "team-a"
