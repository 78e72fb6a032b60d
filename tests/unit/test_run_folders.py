"""Each run of a resource in a cluster writes a folder of its own in the artifact store."""

from __future__ import annotations

from types import SimpleNamespace

from lathe.api import KINDS
from lathe.k8s.builders import ArtifactStore
from lathe.k8s.reconcile import Reconciler
from lathe.plans.base import resume_key
from lathe_trainer.stage import ResolvedInput

ROOT = "pvc://lathe-artifacts/lathe"
FOLDER = f"{ROOT}/team-a/pretrainjob/med"


def pretrain_job(**training) -> object:
    return KINDS["PretrainJob"].model_validate({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
        "metadata": {"name": "med", "namespace": "team-a", "generation": 1},
        "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                 "training": {"maxSteps": 100, **training}},
    })


def inputs(corpus_digest: str = "sha256:c1") -> dict[str, ResolvedInput]:
    return {
        "corpus": ResolvedInput(kind="Corpus", name="c", uri="pvc://c", digest=corpus_digest),
        "tokenizer": ResolvedInput(kind="Tokenizer", name="t", uri="pvc://t", digest="sha256:t"),
    }


def output_uri(resource, resolved, previous=None, same_run=False) -> str:
    # _output_uri reads nothing from the reconciler but its artifact store.
    reconciler = SimpleNamespace(store=ArtifactStore(ROOT))
    key = resume_key(resource, resolved)
    return Reconciler._output_uri(reconciler, resource, key, previous or {}, same_run)


def test_new_run_gets_digest_folder():
    uri = output_uri(pretrain_job(), inputs())
    assert uri.startswith(FOLDER + "/run-")
    assert len(uri.rsplit("/run-", 1)[1]) == 16


def test_changed_input_gets_new_folder():
    assert output_uri(pretrain_job(), inputs("sha256:c2")) != output_uri(pretrain_job(), inputs())


def test_training_change_keeps_folder():
    """A PretrainJob that trains longer continues from the checkpoints of its folder."""
    longer = output_uri(pretrain_job(maxSteps=500, learningRate=1e-4), inputs())
    assert longer == output_uri(pretrain_job(), inputs())


def test_run_in_progress_keeps_folder():
    recorded = f"{FOLDER}/run-0123456789abcdef"
    previous = {"runGeneration": 1, "outputUri": recorded}
    assert output_uri(pretrain_job(), inputs(), previous, same_run=True) == recorded


def test_earlier_release_run_keeps_resource_folder():
    """A run started before outputs had a folder per run continues in the resource's folder."""
    assert output_uri(pretrain_job(), inputs(), {"runGeneration": 1}, same_run=True) == FOLDER


def test_new_run_after_upgrade_keeps_resource_folder():
    """The first new run after an upgrade can continue the checkpoints of the resource folder,
    and later runs with the same resume key continue there too."""
    longer = pretrain_job(maxSteps=500)
    assert output_uri(longer, inputs(), {"runGeneration": 1}) == FOLDER
    previous = {"runGeneration": 2, "outputUri": FOLDER,
                "runResumeKey": resume_key(longer, inputs())}
    assert output_uri(pretrain_job(maxSteps=900), inputs(), previous) == FOLDER
    moved = output_uri(pretrain_job(), inputs("sha256:c2"), previous)
    assert moved.startswith(FOLDER + "/run-")


def test_storage_uri_is_used_as_is():
    resource = pretrain_job()
    resource.spec.storage.uri = "s3://bucket/models/med"
    assert output_uri(resource, inputs()) == "s3://bucket/models/med"
