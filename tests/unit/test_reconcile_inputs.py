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


SETTINGS = {"LATHE_ARTIFACT_ROOT": "file:///artifacts"}
TIME = "2026-12-01T00:00:00Z"
FAILED_EXPORT = {"type": "Failed", "status": "True", "reason": "JobFailed",
                 "message": "Gave up after a permanent error: exit code 42 (Error).",
                 "observedGeneration": 1, "lastTransitionTime": TIME}


def reconcile(body: dict, read_upstream) -> dict:
    """Reconcile `body` without a cluster; `read_upstream` stands in for the read of each
    referenced resource, as CustomObjectsApi.get_namespaced_custom_object."""
    from types import SimpleNamespace

    from lathe.k8s.reconcile import Clients, Reconciler
    from lathe.k8s.settings import OperatorSettings

    clients = Clients.__new__(Clients)
    clients.custom = SimpleNamespace(get_namespaced_custom_object=read_upstream)
    return Reconciler(OperatorSettings.from_env(SETTINGS), clients).reconcile(body)


def not_found(group, version, namespace, plural, name):
    from kubernetes.client.exceptions import ApiException

    raise ApiException(status=404, reason="Not Found")


def finished_corpus(generation: int, observed: int, digest: str | None = None):
    """Return a read of a Corpus that succeeded at generation `observed`."""
    artifact = {"uri": "file:///c", **({"digest": digest} if digest else {})}

    def read(group, version, namespace, plural, name):
        return {"metadata": {"name": name, "generation": generation},
                "status": {"observedGeneration": observed, "artifact": artifact,
                           "conditions": [{"type": "Succeeded", "status": "True",
                                           "reason": "JobSucceeded"}]}}

    return read


def deployment(generation: int, status: dict | None = None) -> dict:
    """Return a ModelDeployment of FineTune 'ner' at `generation`."""
    held_out = "test.tsv" if generation == 1 else "fixed.tsv"
    body = {"apiVersion": "lathe.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "ner", "namespace": "team-a", "uid": "u",
                         "generation": generation},
            "spec": {"model": {"fineTuneRef": {"name": "ner"}},
                     "export": {"heldOutData": held_out}}}
    if status is not None:
        body["status"] = status
    return body


def failed_deployment(ready: dict) -> dict:
    """Return generation 2 of a ModelDeployment whose generation 1 failed, with `ready`."""
    return deployment(2, {"observedGeneration": 1, "phase": "Failed", "runSpecHash": "earlier",
                          "runGeneration": 1, "conditions": [FAILED_EXPORT, ready]})


def _waiting_tokenizer(recorded_spec: dict, spec: dict, generation: int) -> dict:
    """Reconcile a finished Tokenizer whose Corpus is re-running, and return its new status."""
    from lathe.k8s.reconcile import _run_hash, parse

    recorded = parse({**TOKENIZER, "spec": recorded_spec})
    succeeded = {"type": "Succeeded", "status": "True", "reason": "JobSucceeded",
                 "message": "Job pubmed-tokenizer-r1-0 completed.", "observedGeneration": 1,
                 "lastTransitionTime": TIME}
    metadata = {**TOKENIZER["metadata"], "uid": "u", "generation": generation}
    body = {**TOKENIZER, "metadata": metadata, "spec": spec,
            "status": {"observedGeneration": 1, "phase": "Succeeded", "conditions": [succeeded],
                       "runSpecHash": _run_hash(recorded), "runGeneration": 1,
                       "artifact": {"uri": "file:///t", "digest": "sha256:t"}}}
    # The Corpus changed too and its new generation has not been reconciled yet.
    return reconcile(body, finished_corpus(generation=2, observed=1))


def test_changed_spec_drops_old_success():
    """A spec changed while an input re-runs is not shown Succeeded with the old output."""
    new = _waiting_tokenizer(TOKENIZER["spec"], {**TOKENIZER["spec"], "vocabSize": 4000}, 2)
    assert new["observedGeneration"] == 2
    assert new["phase"] == "Waiting"
    assert "artifact" not in new
    assert [c["type"] for c in new["conditions"]] == ["InputsReady"]


def test_unchanged_spec_keeps_old_success():
    """A finished Tokenizer whose input re-runs keeps its output until it runs again."""
    new = _waiting_tokenizer(TOKENIZER["spec"], TOKENIZER["spec"], 1)
    assert new["artifact"] == {"uri": "file:///t", "digest": "sha256:t"}
    assert {c["type"] for c in new["conditions"]} == {"InputsReady", "Succeeded"}


def test_waiting_deployment_sets_ready_false():
    """A ModelDeployment has Ready from its first reconcile, False while its input is missing."""
    new = reconcile(deployment(1), not_found)
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "InputNotFound"
    assert ready["message"].startswith("Triton starts after the export, which waits for its "
                                       "input: Waiting for FineTune 'ner'")
    assert new["phase"] == "Waiting"


def test_changed_deployment_drops_old_failure():
    """A ModelDeployment whose failed spec was changed while its input is missing waits, and
    its Ready no longer blames this generation for the earlier failure."""
    ready = {"type": "Ready", "status": "False", "reason": "JobFailed",
             "message": "No Triton serves this generation, because it failed; see the Failed "
             "condition.", "observedGeneration": 1, "lastTransitionTime": TIME}

    new = reconcile(failed_deployment(ready), not_found)

    assert new["phase"] == "Waiting"
    assert "Failed" not in [c["type"] for c in new["conditions"]]
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InputNotFound"


def test_earlier_release_export_failed_reset():
    """A Ready with ExportFailed, which earlier releases set, goes with the failure it named."""
    ready = {"type": "Ready", "status": "False", "reason": "ExportFailed",
             "message": "No Triton serves this generation, because it failed (JobFailed); see "
             "the Failed condition.", "observedGeneration": 1, "lastTransitionTime": TIME}

    new = reconcile(failed_deployment(ready), not_found)

    assert "Failed" not in [c["type"] for c in new["conditions"]]
    ready = next(c for c in new["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InputNotFound"
    assert ready["observedGeneration"] == 2


def test_reverted_spec_clears_invalid_spec():
    """A spec put back to the last good one after an InvalidSpec shows that run's success."""
    from lathe.k8s.reconcile import _run_hash, parse

    good = parse(TOKENIZER)
    conditions = [
        {"type": "Succeeded", "status": "True", "reason": "JobSucceeded", "message": "Done.",
         "observedGeneration": 1, "lastTransitionTime": TIME},
        {"type": "Failed", "status": "True", "reason": "InvalidSpec",
         "message": "spec.vocabSize: too small", "observedGeneration": 2,
         "lastTransitionTime": "2026-12-01T00:01:00Z"},
    ]
    body = {**TOKENIZER, "metadata": {**TOKENIZER["metadata"], "uid": "u", "generation": 3},
            "status": {"observedGeneration": 2, "phase": "Failed", "conditions": conditions,
                       "runSpecHash": _run_hash(good), "runGeneration": 1, "run": 1,
                       "inputDigests": {"corpus": "sha256:c"},
                       "artifact": {"uri": "file:///t", "digest": "sha256:t"}}}
    new = reconcile(body, finished_corpus(generation=1, observed=1, digest="sha256:c"))
    assert {c["type"] for c in new["conditions"] if c["status"] == "True"} == {
        "Succeeded", "InputsReady"}
    assert new["phase"] == "Succeeded"
