"""Inputs of a resource must fit each other before its stage starts."""

from __future__ import annotations

import copy

from lathe.k8s.reconcile import _inputs_disagree
from lathe_trainer.stage import ResolvedInput

TOKENIZER = {
    "apiVersion": "lathe.dev/v1alpha1", "kind": "Tokenizer",
    "metadata": {"name": "pubmed", "namespace": "team-a", "generation": 1},
    "spec": {"corpusRef": {"name": "pubmed"}},
}


def resolved(corpus: str, tokenizer: str) -> dict[str, ResolvedInput]:
    return {
        "corpus": ResolvedInput(kind="Corpus", name="pubmed", uri="pvc://c", digest=corpus),
        "tokenizer": ResolvedInput(kind="Tokenizer", name="pubmed", uri="pvc://t",
                                   digest=tokenizer),
    }


def upstreams(tokenizer_read: str | None) -> dict[str, dict]:
    tokenizer = copy.deepcopy(TOKENIZER)
    if tokenizer_read:
        tokenizer["status"] = {"inputDigests": {"corpus": tokenizer_read}}
    corpus = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus",
              "metadata": {"name": "pubmed", "namespace": "team-a"},
              "spec": {"sources": [{"name": "a", "format": "text", "path": "a.txt"}]}}
    return {"corpus": corpus, "tokenizer": tokenizer}


def test_tokenizer_of_old_corpus_waits():
    """A Tokenizer that still describes the Corpus's earlier output does not fit its new one."""
    reason = _inputs_disagree(resolved("sha256:new", "sha256:tok"), upstreams("sha256:old"))
    assert reason.startswith("Waiting for Tokenizer 'pubmed' (tokenizer) to run again on the "
                          "current output of Corpus 'pubmed'")
    assert "sha256:old" in reason
    assert "sha256:new" in reason


def test_matching_inputs_fit():
    assert _inputs_disagree(resolved("sha256:new", "sha256:tok"), upstreams("sha256:new")) == ""


def test_unrecorded_inputs_fit():
    """A Tokenizer finished by an earlier release recorded no inputs, and is trusted."""
    assert _inputs_disagree(resolved("sha256:new", "sha256:tok"), upstreams(None)) == ""
