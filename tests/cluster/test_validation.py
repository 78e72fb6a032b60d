"""The real API server rejects invalid specs with messages that name the field and the fix."""

from __future__ import annotations

import copy
import json

import pytest

BASES = {
    "Corpus": {"sources": [{"name": "ncbi", "format": "ncbiDisease", "path": "a.txt"}]},
    "Tokenizer": {"corpusRef": {"name": "pubmed"}},
    "PretrainJob": {"corpusRef": {"name": "pubmed"}, "tokenizerRef": {"name": "pubmed"}},
    "FineTune": {
        "baseModel": {"pretrainJobRef": {"name": "lm"}},
        "data": {"train": "train.tsv", "test": "test.tsv"},
    },
    "ModelDeployment": {"model": {"fineTuneRef": {"name": "ner"}},
                        "export": {"heldOutData": "test.tsv"}},
}

# (kind, change to the valid spec, text the rejection must contain)
INVALID = [
    ("Corpus", {"sources": []}, "spec.sources"),
    ("Corpus", {"sources": [{"name": "x", "format": "pdf", "path": "a"}]},
     "spec.sources[0].format"),
    ("Corpus", {"sources": [{"name": "x", "format": "text"}]}, "spec.sources[0].path"),
    ("Corpus", {"split": {"validationFraction": 0.7}}, "spec.split.validationFraction"),
    ("Corpus", {"dedup": {"near": {"threshold": 1.5}}}, "spec.dedup.near.threshold"),
    ("Corpus", {"shards": 0}, "spec.shards"),
    ("Corpus", {"storage": {"uri": "ftp://host/corpus"}},
     'spec.storage.uri: Invalid value: "ftp://host/corpus": use file:///absolute/path, '
     "pvc://<claim>/<path> or s3://<bucket>/<prefix>"),
    ("Corpus", {"workers": 0}, "spec.workers"),
    ("Corpus", {"pii": {"redact": ["passport"]}}, "spec.pii.redact[0]"),
    ("Tokenizer", {"corpusRef": None}, "spec.corpusRef"),
    ("Tokenizer", {"vocabSize": 100}, "spec.vocabSize"),
    ("Tokenizer", {"specialTokens": ["<pad>"]},
     "spec.specialTokens must include <|endoftext|>, <pad> and <unk>"),
    ("Tokenizer", {"protectedPatterns": [{"name": "a", "regex": "x"}, {"name": "a", "regex": "y"}]},
     'spec.protectedPatterns[1]: Duplicate value: {"name":"a"}'),
    ("PretrainJob", {"model": {"hiddenSize": 130, "numHeads": 4}},
     "spec.model.hiddenSize must be a multiple of spec.model.numHeads"),
    ("PretrainJob", {"sequenceLength": 1024, "model": {"maxPositionEmbeddings": 512}},
     "spec.sequenceLength must not exceed spec.model.maxPositionEmbeddings"),
    # The preset's sizes count where the spec sets none: 125m has 12 heads, tiny 512 positions.
    ("PretrainJob", {"model": {"preset": "125m", "hiddenSize": 100}},
     "spec.model.hiddenSize must be a multiple of spec.model.numHeads"),
    ("PretrainJob", {"sequenceLength": 1024},
     "spec.sequenceLength must not exceed spec.model.maxPositionEmbeddings"),
    ("PretrainJob", {"training": {"maxSteps": 10, "warmupSteps": 20}},
     "training.warmupSteps must be less than training.maxSteps"),
    ("PretrainJob", {"distributed": {"backend": "nccl"}},
     "spec.distributed.backend nccl needs GPUs"),
    ("PretrainJob", {"distributed": {"nodes": 0}}, "spec.distributed.nodes"),
    ("PretrainJob", {"training": {"precision": "fp8"}}, "spec.training.precision"),
    ("PretrainJob", {"resources": {"gpus": 17}}, "spec.resources.gpus"),
    ("PretrainJob", {"model": {"architecture": "mamba"}}, "spec.model.architecture"),
    ("PretrainJob", {"scheduling": {"tolerations": [{"key": "a", "operator": "Exists",
                                                     "value": "b"}]}},
     "remove value, or use operator Equal"),
    ("PretrainJob", {"scheduling": {"tolerations": [{"key": "a", "effect": "NoSchedule",
                                                     "tolerationSeconds": 30}]}},
     "tolerationSeconds applies only to effect NoExecute"),
    ("PretrainJob", {"scheduling": {"tolerations": [{"key": "a", "tolerationSeconds": 30}]}},
     "tolerationSeconds applies only to effect NoExecute"),
    ("PretrainJob", {"scheduling": {"priorityClassName": "Not_Valid"}},
     'spec.scheduling.priorityClassName: Invalid value: "Not_Valid": must be the name of a '
     "PriorityClass"),
    ("FineTune", {"baseModel": {"pretrainJobRef": {"name": "lm"}, "uri": "file:///m"}},
     "set exactly one of spec.baseModel.pretrainJobRef and spec.baseModel.uri"),
    ("FineTune", {"baseModel": {}},
     "set exactly one of spec.baseModel.pretrainJobRef and spec.baseModel.uri"),
    ("FineTune", {"method": "prefix"}, "spec.method"),
    ("FineTune", {"data": {"train": "same.tsv", "test": "same.tsv"}},
     "spec.data.test must differ from spec.data.train"),
    ("FineTune", {"lora": {"r": 0}}, "spec.lora.r"),
    ("FineTune", {"training": {"learningRate": 0}}, "spec.training.learningRate"),
    ("ModelDeployment", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"),
    # The HorizontalPodAutoscaler's replica counts are int32.
    ("ModelDeployment", {"autoscaling": {"maxReplicas": 2**31}},
     "spec.autoscaling.maxReplicas: Invalid value: 2147483648: spec.autoscaling.maxReplicas in "
     "body should be less than or equal to 2147483647"),
    ("ModelDeployment", {"autoscaling": {"minReplicas": 2**31, "maxReplicas": 2**31}},
     "spec.autoscaling.minReplicas: Invalid value: 2147483648"),
    ("ModelDeployment", {"serving": {"httpPort": 8001}},
     "spec.serving.httpPort, grpcPort and metricsPort must differ"),
    ("ModelDeployment", {"modelName": "bad name!"},
     'spec.modelName: Invalid value: "bad name!": may contain only letters, digits'),
    ("ModelDeployment", {"export": {"checkSequenceLengths": [20]}},
     "spec.export.checkSequenceLengths"),
    ("ModelDeployment", {"serving": {"replicas": -1}}, "spec.serving.replicas"),
    ("PretrainJob", {"resources": {"cpu": 1.5}}, "spec.resources.cpu"),
    ("PretrainJob", {"resources": {"memory": "4GB"}},
     'spec.resources.memory: Invalid value: "4GB": not a Kubernetes quantity; write bytes'),
    ("PretrainJob", {"resources": {"memory": 0}},
     "spec.resources.memory: Invalid value: 0: a quantity must be more than zero"),
    ("Corpus", {"resources": {"cpu": "0m"}},
     'spec.resources.cpu: Invalid value: "0m": a quantity must be more than zero'),
    ("ModelDeployment", {"serving": {"resources": {"shmSize": "1 Gi"}}},
     'spec.serving.resources.shmSize: Invalid value: "1 Gi": not a Kubernetes quantity'),
    ("Corpus", {"sources": [{"name": "x", "format": "text", "path": "fille:///x"}]},
     'spec.sources[0].path: Invalid value: "fille:///x": unsupported URI scheme; use a path '
     "relative to the data directory"),
    ("FineTune", {"data": {"train": "file://data/train.tsv", "test": "test.tsv"}},
     'spec.data.train: Invalid value: "file://data/train.tsv": file:// data paths must have the '
     "form file:///absolute/path"),
    ("ModelDeployment", {"export": {"heldOutData": "pvc://claim-only"}},
     "spec.export.heldOutData: Invalid value: \"pvc://claim-only\": pvc:// data paths must have "
     "the form pvc://<claim>/<path>"),
    ("Tokenizer", {"protectedPatterns": [{"name": "a", "regex": "x", "vocabularyFile": "s3://b"}]},
     "s3:// data paths must have the form s3://<bucket>/<key>"),
    ("Corpus", {"dedup": {"near": {"threshold": True}}}, "spec.dedup.near.threshold"),
    ("Tokenizer", {"vocabSize": "8000"}, "spec.vocabSize"),
    ("PretrainJob", {"training": {"artifactUri": "fille:///x"}},
     'spec.training.artifactUri: Invalid value: "fille:///x": use file:///absolute/path'),
    ("PretrainJob", {"training": {"seed": 2**32}}, "spec.training.seed"),
    ("ModelDeployment", {"modelName": "x" * 129}, "spec.modelName"),
    ("ModelDeployment", {"export": {"checkSequenceLengths": [0, 20]}},
     "spec.export.checkSequenceLengths[0]"),
    ("ModelDeployment", {"export": None}, "spec.export: Required value"),
    ("ModelDeployment", {"export": {}}, "spec.export.heldOutData: Required value"),
    ("FineTune", {"training": {"artifactUri": "s3://b/x"}},
     "spec.training.artifactUri is PretrainJob only"),
    ("FineTune", {"baseModel": {"pretrainJobRef": {"name": ""}}},
     'spec.baseModel.pretrainJobRef.name: Invalid value: "": must be a DNS-1123 label'),
    ("FineTune", {"baseModel": {"pretrainJobRef": {"name": "Pubmed_LM"}}},
     'spec.baseModel.pretrainJobRef.name: Invalid value: "Pubmed_LM": must be a DNS-1123 label'),
    ("Tokenizer", {"corpusRef": {"name": "my.corpus"}},
     'spec.corpusRef.name: Invalid value: "my.corpus": must be a DNS-1123 label'),
    ("PretrainJob", {"tokenizerRef": {"name": "a" * 64}},
     "spec.tokenizerRef.name: Too long: may not be more than 63 bytes"),
    ("ModelDeployment", {"model": {"fineTuneRef": {"name": "-ner"}}},
     "set it to the metadata.name of the referenced resource"),
    ("FineTune", {"method": "full", "lora": {"r": 16}},
     "spec.lora applies only to method lora, and method full would ignore it; remove spec.lora "
     "or set method: lora"),
    ("FineTune", {"method": "full", "lora": {"targetModules": ["q_proj"]}},
     "spec.lora applies only to method lora"),
    ("Corpus", {"sources": [{"name": "ncbi", "format": "text", "path": "a.txt"},
                            {"name": "ncbi", "format": "text", "path": "b.txt"}]},
     'spec.sources[1]: Duplicate value: {"name":"ncbi"}'),
    ("Corpus", {"decontamination": {"evalSets": [{"name": "t", "format": "text", "path": "a"},
                                                 {"name": "t", "format": "text", "path": "b"}]}},
     'spec.decontamination.evalSets[1]: Duplicate value: {"name":"t"}'),
    ("Tokenizer", {"specialTokens": ["<|endoftext|>", "<pad>", "<unk>", "<pad>"]},
     'spec.specialTokens[3]: Duplicate value: "<pad>"'),
    ("Corpus", {"sources": [{"name": f"s{index}", "format": "text", "path": "a.txt"}
                            for index in range(10001)]},
     "spec.sources: Too many: 10001: must have at most 10000 items"),
    ("Corpus", {"sources": [{"name": "x", "format": "text", "path": "a" * 2049}]},
     "spec.sources[0].path: Too long: may not be more than 2048 bytes"),
    ("PretrainJob", {"distributed": {"procsPerNode": 4}, "resources": {"gpus": 2}},
     "spec.distributed.procsPerNode must be 1 or equal spec.resources.gpus, because each node runs one "
     "process per GPU; remove procsPerNode to take the GPU count, or set it to "
     "spec.resources.gpus"),
    ("FineTune", {"distributed": {"procsPerNode": 2}, "resources": {"gpus": 8}},
     "spec.distributed.procsPerNode must be 1 or equal spec.resources.gpus"),
]

# Changes that the API server and the API models both accept.
VALID = [
    ("PretrainJob", {"resources": {"cpu": 2, "memory": "16Gi"}}),
    ("PretrainJob", {"resources": {"cpu": "500m", "memory": 17179869184}}),
    ("Corpus", {"sources": [{"name": "x", "format": "text", "path": "s3://bucket/a.txt"}]}),
    ("Corpus", {"sources": [{"name": "x", "format": "text", "path": "a" * 2048}]}),
    ("Tokenizer", {"corpusRef": {"name": "a" * 63}}),
    ("FineTune", {"method": "full"}),
    # The API server fills in an absent lora block with these defaults, so they pass.
    ("FineTune", {"method": "full", "lora": {"r": 8, "alpha": 16}}),
    ("FineTune", {"method": "lora", "lora": {"r": 16, "targetModules": ["q_proj"]}}),
    ("PretrainJob", {"distributed": {"procsPerNode": 2}, "resources": {"gpus": 2}}),
    ("PretrainJob", {"resources": {"gpus": 4}}),
    ("PretrainJob", {"distributed": {"procsPerNode": 4}}),
    ("PretrainJob", {"model": {"preset": "7b"}, "sequenceLength": 4096}),
    ("PretrainJob", {"model": {"preset": "125m", "numHeads": 24}}),
]


def build(kind: str, change: dict) -> dict:
    spec = copy.deepcopy(BASES[kind])
    for key, value in change.items():
        if value is None:
            spec.pop(key, None)
        elif value and isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {"apiVersion": "lathe.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "invalid"}, "spec": spec}


def test_table_has_at_least_twenty_cases():
    assert len(INVALID) >= 20


@pytest.mark.parametrize("kind", sorted(BASES))
def test_valid_base_is_accepted(cluster, namespace, kind):
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(build(kind, {})), check=False)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(("kind", "change", "expected"), INVALID,
                         ids=[f"{k}-{e[:40]}" for k, _, e in INVALID])
def test_invalid_spec_is_rejected(cluster, namespace, kind, change, expected):
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(build(kind, change)), check=False)
    assert completed.returncode != 0, f"accepted: {change}"
    assert expected in completed.stderr, completed.stderr


@pytest.mark.parametrize(("kind", "change", "expected"), INVALID,
                         ids=[f"{k}-{e[:40]}" for k, _, e in INVALID])
def test_models_reject_what_server_rejects(kind, change, expected):
    """`lathe validate` checks with the API models, so they must reject the same specs."""
    from pydantic import ValidationError

    from lathe.api import KINDS

    with pytest.raises(ValidationError):
        KINDS[kind].model_validate(build(kind, change))


@pytest.mark.parametrize(("kind", "change"), VALID, ids=[k for k, _ in VALID])
def test_valid_change_accepted_by_both(cluster, namespace, kind, change):
    from lathe.api import KINDS

    manifest = build(kind, change)
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(manifest), check=False)
    assert completed.returncode == 0, completed.stderr
    KINDS[kind].model_validate(manifest)


def test_unknown_field_is_rejected(cluster, namespace):
    manifest = build("PretrainJob", {"trainng": {"maxSteps": 3}})
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(manifest), check=False)
    assert completed.returncode != 0
    assert 'unknown field "spec.trainng"' in completed.stderr


# (metadata.name of a Corpus, text the rejection must contain)
INVALID_NAMES = [
    ("my.corpus", 'metadata.name: Invalid value: "my.corpus": must not contain \'.\', because '
     "Lathe names Jobs, Services and pod labels after the resource"),
    ("my.corpus", "rename it, for example to 'my-corpus'"),
    ("a" * 64, "metadata.name: Too long: may not be more than 63 bytes"),
]


@pytest.mark.parametrize(("name", "expected"), INVALID_NAMES)
def test_invalid_resource_name_rejected(cluster, namespace, name, expected):
    """The API server accepts a DNS subdomain as a name, and the CRDs narrow it to a label."""
    from lathe.api import KINDS

    manifest = build("Corpus", {})
    manifest["metadata"]["name"] = name
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(manifest), check=False)
    assert completed.returncode != 0, f"accepted: {name}"
    assert expected in completed.stderr, completed.stderr
    with pytest.raises(ValueError, match="must be a DNS-1123 label"):
        KINDS["Corpus"].model_validate(manifest)


# Data paths around the edges of the accepted forms, which the server and the models must
# judge alike.
DATA_PATHS = [
    "a.txt", "/data/a.txt", "notes/a:b.txt", "a:/b", "a:", ":", "::x", "/:/", "a:/", "a:b:/c",
    "file:///a", "file:///", "file://host/a", "pvc://claim/a", "pvc://claim/", "pvc:///a",
    "s3://bucket/a", "s3://bucket", "s3:///a", "gs://bucket/a", "x://", "a/x://y",
    "pvc://a://b/c", "file://x://y", "FILE:///a", "s3://b/k/", "pvc://c//", "é://x",
]


def test_data_paths_judged_alike(cluster, namespace):
    from pydantic import ValidationError

    from lathe.api import KINDS

    verdicts = {}
    for path in DATA_PATHS:
        manifest = build("Corpus", {"sources": [{"name": "x", "format": "text", "path": path}]})
        completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                    input=json.dumps(manifest), check=False)
        try:
            KINDS["Corpus"].model_validate(manifest)
            models_accept = True
        except ValidationError:
            models_accept = False
        verdicts[path] = (completed.returncode == 0, models_accept)
    assert {path: server for path, (server, _) in verdicts.items()} == {
        path: models for path, (_, models) in verdicts.items()}
    assert verdicts["notes/a:b.txt"] == (True, True)
    assert verdicts["gs://bucket/a"] == (False, False)


def test_data_path_error_is_readable(cluster, namespace):
    manifest = build("Corpus", {"sources": [{"name": "x", "format": "text", "path": "fille:///x"}]})
    completed = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                                input=json.dumps(manifest), check=False)
    assert completed.returncode != 0
    assert ('spec.sources[0].path: Invalid value: "fille:///x": unsupported URI scheme; use a '
            "path relative to the data directory or an absolute path (without '://'), "
            "file:///absolute/path, pvc://<claim>/<path> or s3://<bucket>/<key>"
            in completed.stderr), completed.stderr
    assert "[^/]" not in completed.stderr


@pytest.mark.parametrize(("validate", "accepted", "expected"), [
    ("strict", False, 'unknown field "spec.trainng"'),
    ("warn", True, 'unknown field "spec.trainng"'),
    ("false", True, ""),
])
def test_unknown_field_by_validate_mode(cluster, namespace, validate, accepted, expected):
    """kubectl's --validate decides whether an unknown field fails or is dropped."""
    manifest = build("PretrainJob", {"trainng": {"maxSteps": 3}})
    manifest["metadata"]["name"] = f"unknown-{validate}"
    completed = cluster.kubectl("apply", f"--validate={validate}", "-n", namespace, "-f", "-",
                                input=json.dumps(manifest), check=False)
    assert (completed.returncode == 0) == accepted, completed.stderr
    assert expected in completed.stderr
    if accepted:
        stored = cluster.get_json("pretrainjob", manifest["metadata"]["name"], "-n", namespace)
        assert "trainng" not in stored["spec"]
