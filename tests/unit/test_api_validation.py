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
    "ModelDeployment": {"model": {"fineTuneRef": {"name": "ner"}},
                        "export": {"heldOutData": "test.tsv"}},
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


@pytest.mark.parametrize(
    ("kind", "spec", "field", "fix"),
    [
        ("Corpus", {"dedup": {"near": {"threshold": True}}}, "spec.dedup.near.threshold",
         "expected a number, got a boolean"),
        ("Corpus", {"normalization": {"collapseWhitespace": "no"}},
         "spec.normalization.collapseWhitespace", "write true or false without quotes"),
        ("Corpus", {"shards": 2.5}, "spec.shards", "expected an integer, got a number"),
        ("Tokenizer", {"vocabSize": "8000"}, "spec.vocabSize", "remove the quotes"),
        ("Tokenizer", {"lowercase": 1}, "spec.lowercase", "expected true or false"),
        ("Tokenizer", {"corpusRef": {"name": 7}}, "spec.corpusRef.name", "expected a string"),
        ("PretrainJob", {"training": {"maxSteps": "10"}}, "spec.training.maxSteps",
         "remove the quotes"),
        ("PretrainJob", {"suspend": "true"}, "spec.suspend", "without quotes"),
        ("ModelDeployment", {"serving": {"replicas": False}}, "spec.serving.replicas",
         "YAML reads"),
    ],
)
def test_wrong_type_rejected(kind, spec, field, fix):
    body = document(kind)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key].update(value)
        else:
            body["spec"][key] = value
    error = rejection(body)
    assert error.field == field
    assert fix in error.detail


def test_integer_accepted_for_number():
    """An integer is a valid `number`, as in the CRD."""
    body = document("Corpus")
    body["spec"]["dedup"] = {"near": {"threshold": 1}}
    resource = loader.parse_resource(body, "resource.yaml")
    assert resource.spec.dedup.near.threshold == 1.0


def test_enum_values_accepted():
    body = document("Corpus")
    body["spec"]["pii"] = {"redact": ["email", "mrn"]}
    body["spec"]["normalization"] = {"unicodeForm": "NFKC"}
    resource = loader.parse_resource(body, "resource.yaml")
    assert resource.spec.sources[0].format == "ncbiDisease"
    assert resource.spec.pii.redact == ["email", "mrn"]
    assert resource.spec.normalization.unicode_form == "NFKC"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_operator_parses_server_object(kind):
    """The operator parses the API server's JSON object in strict mode."""
    from lathe.k8s.reconcile import parse

    resource = loader.parse_resource(document(kind), "resource.yaml")
    body = resource.model_dump(mode="json", by_alias=True)
    body["metadata"] = {"name": "test", "namespace": "team-a", "uid": "u-1", "generation": 3}
    parsed = parse(body)
    assert parsed.spec == resource.spec
    assert parsed.metadata.generation == 3


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_spec_round_trips_through_json(kind):
    """The trainer reads each spec back from the stage config's JSON."""
    from lathe.api import KINDS

    resource = loader.parse_resource(document(kind), "resource.yaml")
    spec_type = type(resource.spec)
    dumped = resource.spec.model_dump(mode="json", by_alias=True)
    assert spec_type.model_validate(dumped) == resource.spec
    assert spec_type.model_validate_json(resource.spec.model_dump_json()) == resource.spec
    assert KINDS[kind].model_validate(resource.model_dump(mode="json", by_alias=True))


def test_condition_status_from_string():
    from lathe.api.common import Condition

    assert Condition.model_validate({"type": "Succeeded", "status": "True"}).status == "True"


def resources(**values: Any) -> dict[str, Any]:
    body = document("PretrainJob")
    body["spec"]["resources"] = values
    return body


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"cpu": 2}, {"cpu": "2"}),
        ({"cpu": "500m"}, {"cpu": "500m"}),
        ({"cpu": "1.5"}, {"cpu": "1.5"}),
        ({"memory": "16Gi", "shmSize": "4G"}, {"memory": "16Gi", "shm_size": "4G"}),
        ({"memory": 1073741824}, {"memory": "1073741824"}),
        ({"memory": "1.5Gi", "shmSize": "512Mi"}, {"memory": "1.5Gi", "shm_size": "512Mi"}),
        ({"memory": "1e9"}, {"memory": "1e9"}),
    ],
)
def test_quantity_accepted(values, expected):
    resource = loader.parse_resource(resources(**values), "resource.yaml")
    for name, value in expected.items():
        assert getattr(resource.spec.resources, name) == value


@pytest.mark.parametrize(
    ("values", "field", "hint"),
    [
        ({"cpu": "two"}, "spec.resources.cpu", "'500m'"),
        ({"cpu": "-2"}, "spec.resources.cpu", "'500m'"),
        ({"cpu": -2}, "spec.resources.cpu", "more than zero"),
        ({"cpu": 0}, "spec.resources.cpu", "more than zero"),
        ({"cpu": "0m"}, "spec.resources.cpu", "more than zero"),
        ({"memory": "0Gi"}, "spec.resources.memory", "more than zero"),
        ({"cpu": 1.5}, "spec.resources.cpu", "must be a string"),
        ({"cpu": "2k"}, "spec.resources.cpu", "'500m'"),
        ({"cpu": True}, "spec.resources.cpu", "'500m'"),
        ({"memory": "4GB"}, "spec.resources.memory", "'16Gi'"),
        ({"memory": "-1Gi"}, "spec.resources.memory", "'16Gi'"),
        ({"memory": "lots"}, "spec.resources.memory", "'16Gi'"),
        ({"shmSize": "1 Gi"}, "spec.resources.shmSize", "'16Gi'"),
        ({"memory": "16Gi\n"}, "spec.resources.memory", "'16Gi'"),
        ({"memory": "+16Gi"}, "spec.resources.memory", "'16Gi'"),
        ({"memory": "1500m"}, "spec.resources.memory", "'16Gi'"),
        ({"memory": "0e3"}, "spec.resources.memory", "more than zero"),
        ({"memory": "0.0"}, "spec.resources.memory", "more than zero"),
    ],
)
def test_invalid_quantity_rejected(values, field, hint):
    error = rejection(resources(**values))
    assert error.field == field
    assert hint in error.detail
    assert repr(next(iter(values.values()))) in error.detail


def test_whole_number_accepted_for_integer():
    """The API server accepts 2.0 for an integer field, and kubectl sends it as 2."""
    body = document("Corpus")
    body["spec"]["shards"] = 2.0
    resource = loader.parse_resource(body, "resource.yaml")
    assert resource.spec.shards == 2
    assert isinstance(resource.spec.shards, int)


# (kind, field as in errors, change that sets the field to the path)
DATA_PATH_FIELDS = [
    ("Corpus", "spec.sources[0].path", lambda spec, path: spec["sources"][0].update(path=path)),
    ("Corpus", "spec.decontamination.evalSets[0].path",
     lambda spec, path: spec.update(decontamination={"evalSets": [
         {"name": "test", "format": "text", "path": path}]})),
    ("Tokenizer", "spec.protectedPatterns[0].vocabularyFile",
     lambda spec, path: spec.update(protectedPatterns=[
         {"name": "icd10", "regex": "[A-Z][0-9]+", "vocabularyFile": path}])),
    ("FineTune", "spec.data.train", lambda spec, path: spec["data"].update(train=path)),
    ("FineTune", "spec.data.validation", lambda spec, path: spec["data"].update(validation=path)),
    ("FineTune", "spec.data.test", lambda spec, path: spec["data"].update(test=path)),
    ("FineTune", "spec.baseModel.uri", lambda spec, path: spec.update(baseModel={"uri": path})),
    ("ModelDeployment", "spec.export.heldOutData",
     lambda spec, path: spec.update(export={"heldOutData": path})),
]


def with_data_path(kind, change, path: str) -> dict[str, Any]:
    body = document(kind)
    change(body["spec"], path)
    return body


@pytest.mark.parametrize(("kind", "field", "change"), DATA_PATH_FIELDS,
                         ids=[field for _, field, _ in DATA_PATH_FIELDS])
@pytest.mark.parametrize("path", ["pubmed/a.txt", "/data/a.txt", "file:///data/a.txt",
                                  "pvc://data-claim/pubmed/a.txt", "s3://bucket/pubmed/a.txt",
                                  "notes/a:b.txt"])
def test_data_path_accepted(kind, field, change, path):
    loader.parse_resource(with_data_path(kind, change, path), "resource.yaml")


@pytest.mark.parametrize(("kind", "field", "change"), DATA_PATH_FIELDS,
                         ids=[field for _, field, _ in DATA_PATH_FIELDS])
@pytest.mark.parametrize(
    ("path", "hint"),
    [
        ("fille:///data/a.txt", "unsupported URI scheme 'fille'"),
        ("gs://bucket/a.txt", "unsupported URI scheme 'gs'"),
        ("file://data/a.txt", "file:///absolute/path"),
        ("s3://bucket", "s3://<bucket>/<key>"),
        ("pvc://claim-only", "pvc://<claim>/<path>"),
        ("data/x://y", "unsupported URI scheme 'data/x'"),
        ("", "must not be empty"),
    ],
)
def test_invalid_data_path_rejected(kind, field, change, path, hint):
    error = rejection(with_data_path(kind, change, path))
    assert error.field == field
    assert hint in error.detail
    assert repr(path) in error.detail


def pretrain(**spec: Any) -> dict[str, Any]:
    body = document("PretrainJob")
    body["spec"].update(spec)
    return body


STAGES = [{"untilStep": 50, "sequenceLength": 64}, {"sequenceLength": 128}]

# (resource body, field the error names, bad value it shows)
CROSS_FIELD = [
    (pretrain(sequenceLength=1024, model={"maxPositionEmbeddings": 512}),
     "spec.sequenceLength", 1024),
    (pretrain(sequenceLength=1024), "spec.sequenceLength", 1024),
    (pretrain(curriculum={"stages": [{"untilStep": 50}, {"sequenceLength": 4096}]}),
     "spec.curriculum.stages[1].sequenceLength", 4096),
    (pretrain(curriculum={"stages": [{"sequenceLength": 64}, {"sequenceLength": 128}]}),
     "spec.curriculum.stages[0].untilStep", None),
    (pretrain(curriculum={"stages": [{"untilStep": 50}, {"untilStep": 40}, {}]}),
     "spec.curriculum.stages[1].untilStep", 40),
    (pretrain(curriculum={"stages": STAGES}, training={"maxSteps": 50, "warmupSteps": 5}),
     "spec.curriculum.stages[0].untilStep", 50),
    (pretrain(model={"numHeads": 3}), "spec.model.numHeads", 3),
    (pretrain(model={"hiddenSize": 130}), "spec.model.hiddenSize", 130),
    (pretrain(model={"hiddenSize": 130, "numHeads": 4}), "spec.model.hiddenSize", 130),
    (pretrain(model={"hiddenSize": 24, "numHeads": 8}), "spec.model.numHeads", 8),
    (pretrain(model={"numHeads": 128}), "spec.model.numHeads", 128),
    (pretrain(model={"architecture": "bert", "objective": "causalLM"}), "spec.model.objective",
     "causalLM"),
    (pretrain(scheduling={"tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}),
     "spec.scheduling.tolerations[0].value", "b"),
    (pretrain(scheduling={"tolerations": [{"operator": "Equal", "value": "b"}]}),
     "spec.scheduling.tolerations[0].key", None),
    (pretrain(scheduling={"tolerations": [{"key": "a", "tolerationSeconds": 30}]}),
     "spec.scheduling.tolerations[0].tolerationSeconds", 30),
]


def finetune(**spec: Any) -> dict[str, Any]:
    body = document("FineTune")
    body["spec"].update(spec)
    return body


def deployment(**spec: Any) -> dict[str, Any]:
    body = document("ModelDeployment")
    body["spec"].update(spec)
    return body


CROSS_FIELD += [
    (finetune(baseModel={"pretrainJobRef": {"name": "lm"}, "uri": "file:///m"}),
     "spec.baseModel.uri", "file:///m"),
    (finetune(baseModel={}), "spec.baseModel.uri", None),
    (finetune(data={"train": "same.tsv", "test": "same.tsv"}), "spec.data.test", "same.tsv"),
    (deployment(serving={"httpPort": 8001}), "spec.serving.grpcPort", 8001),
    (deployment(serving={"metricsPort": 8000}), "spec.serving.metricsPort", 8000),
    (deployment(serving={"grpcPort": 8002}), "spec.serving.metricsPort", 8002),
    (deployment(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
     "spec.autoscaling.minReplicas", 5),
]


@pytest.mark.parametrize(("body", "field", "value"), CROSS_FIELD,
                         ids=[f"{field}={value}" for _, field, value in CROSS_FIELD])
def test_cross_field_error_names_field(body, field, value):
    error = rejection(body)
    assert error.field == field
    if value is None:
        # A missing field has no value to show.
        assert not error.detail.startswith("invalid value"), error.detail
    else:
        assert error.detail.startswith(f"invalid value {value!r}: ")
    assert "corpusRef" not in error.detail
    assert "fineTuneRef" not in error.detail
    assert len(error.detail) < 400


def test_rule_without_field_names_object():
    """A rule over several fields without one to blame names its object and shows no value."""
    from pydantic import ValidationError

    from lathe.api.common import ApiModel, CelRule

    class Window(ApiModel):
        cel_rules = (CelRule(rule="self.low < self.high", message="low must be below high",
                             check=lambda window: window.low < window.high),)
        low: int = 0
        high: int = 1

    with pytest.raises(ValidationError) as raised:
        Window.model_validate({"low": 2, "high": 1})
    error = raised.value.errors()[0]
    assert error["loc"] == ()
    assert "low must be below high" in error["msg"]


def test_backend_rule_names_backend():
    error = rejection(pretrain(distributed={"backend": "nccl"}))
    assert error.field == "spec.distributed.backend"
    assert "nccl needs GPUs" in error.detail
    assert "corpusRef" not in error.detail


@pytest.mark.parametrize("regex", [r"\b", "a*", "(?=E)", r"(?<=\s)"])
def test_empty_matching_pattern_rejected(regex):
    body = document("Tokenizer")
    body["spec"]["protectedPatterns"] = [{"name": "p", "regex": regex}]
    error = rejection(body)
    assert error.field == "spec.protectedPatterns[0].regex"
    assert "matches the empty string" in error.detail


@pytest.mark.parametrize(("regex", "fix"), [
    ("E11|", "removing the empty alternative that a `|` leaves"),
    ("(|E11)", "removing the empty alternative that a `|` leaves"),
    ("E*", "replacing `*` with `+`"),
])
def test_empty_match_fix_fits_pattern(regex, fix):
    body = document("Tokenizer")
    body["spec"]["protectedPatterns"] = [{"name": "p", "regex": regex}]
    assert fix in rejection(body).detail


@pytest.mark.parametrize(("export", "field"), [(None, "spec.export"),
                                               ({}, "spec.export.heldOutData"),
                                               ({"opset": 18}, "spec.export.heldOutData")])
def test_held_out_data_required(export, field):
    """The export's ONNX and quantization checks read heldOutData, so it cannot be left out."""
    body = document("ModelDeployment")
    if export is None:
        del body["spec"]["export"]
    else:
        body["spec"]["export"] = export
    error = rejection(body)
    assert error.field == field
    assert "required field is missing" in error.detail


# (kind, field as in errors, change that sets the reference to the name)
REFERENCE_FIELDS = [
    ("Tokenizer", "spec.corpusRef.name", lambda spec, name: spec.update(corpusRef={"name": name})),
    ("PretrainJob", "spec.tokenizerRef.name",
     lambda spec, name: spec.update(tokenizerRef={"name": name})),
    ("FineTune", "spec.baseModel.pretrainJobRef.name",
     lambda spec, name: spec.update(baseModel={"pretrainJobRef": {"name": name}})),
    ("ModelDeployment", "spec.model.fineTuneRef.name",
     lambda spec, name: spec.update(model={"fineTuneRef": {"name": name}})),
]


@pytest.mark.parametrize(("kind", "field", "change"), REFERENCE_FIELDS,
                         ids=[field for _, field, _ in REFERENCE_FIELDS])
@pytest.mark.parametrize(("name", "suggestion"), [("", None), ("Pubmed_LM", "pubmed-lm"),
                                                  ("my.corpus", "my-corpus"), ("-lm", "lm")])
def test_invalid_reference_name_explained(kind, field, change, name, suggestion):
    """The fix suggests a name made from the value, and none when nothing of it is left."""
    body = document(kind)
    change(body["spec"], name)
    error = rejection(body)
    assert error.field == field
    assert error.detail.startswith(f"invalid value {name!r}: must be a DNS-1123 label")
    fix = "set it to the metadata.name of the referenced resource"
    if suggestion is None:
        assert error.detail.endswith(f"; {fix}.")
    else:
        assert f"{fix}, for example {suggestion!r}" in error.detail


def test_long_reference_name_rejected():
    body = document("Tokenizer")
    body["spec"]["corpusRef"]["name"] = "a" * 64
    error = rejection(body)
    assert error.field == "spec.corpusRef.name"
    assert "at most 63 characters" in error.detail


@pytest.mark.parametrize("name", ["a", "pubmed-lm", "1b", "a" * 63])
def test_valid_reference_name_accepted(name):
    body = document("Tokenizer")
    body["spec"]["corpusRef"]["name"] = name
    resource = loader.parse_resource(body, "resource.yaml")
    assert resource.references() == {"corpus": ("Corpus", name)}


@pytest.mark.parametrize("lora", [{"r": 16}, {"alpha": 8}, {"dropout": 0.1},
                                  {"targetModules": ["q_proj"]}])
def test_lora_with_full_method_rejected(lora):
    error = rejection(finetune(method="full", lora=lora))
    assert error.field == "spec.lora"
    assert error.detail == ("spec.lora applies only to method lora, and method full would "
                            "ignore it; remove spec.lora or set method: lora.")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_finetune_precision_accepted(precision):
    body = finetune(training={"precision": precision})
    assert loader.parse_resource(body, "resource.yaml").spec.training.precision == precision


@pytest.mark.parametrize("policy", ["fail", "skip", "rollback"])
def test_finetune_non_finite_policy_accepted(policy):
    body = finetune(training={"nonFinite": policy, "maxNonFiniteSteps": 3})
    assert loader.parse_resource(body, "resource.yaml").spec.training.non_finite == policy


@pytest.mark.parametrize("lora", [None, {}, {"r": 8, "alpha": 16, "dropout": 0.05,
                                             "targetModules": []}])
def test_default_lora_with_full_method_accepted(lora):
    """The API server fills in an absent lora block with the defaults, so they must pass."""
    body = finetune(method="full") if lora is None else finetune(method="full", lora=lora)
    assert loader.parse_resource(body, "resource.yaml").spec.method == "full"


@pytest.mark.parametrize("kind", ["PretrainJob", "FineTune"])
@pytest.mark.parametrize(("gpus", "procs", "valid"), [
    (2, 4, False), (8, 2, False), (2, 2, True), (2, 1, True), (0, 4, True),
])
def test_procs_per_node_matches_gpus(kind, gpus, procs, valid):
    body = document(kind)
    body["spec"].update(resources={"gpus": gpus}, distributed={"procsPerNode": procs})
    if valid:
        loader.parse_resource(body, "resource.yaml")
        return
    error = rejection(body)
    assert error.field == "spec.distributed.procsPerNode"
    assert error.detail.startswith(
        f"invalid value {procs}: spec.distributed.procsPerNode must be 1 or equal spec.resources.gpus")
    assert "remove procsPerNode to take the GPU count" in error.detail


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"sources": [{"name": "a", "format": "text", "path": "x"},
                  {"name": "a", "format": "text", "path": "y"}]},
     "spec.sources", "source names ['a'] are used more than once"),
    ({"sources": [{"name": "a", "format": "text", "path": "x"}],
      "decontamination": {"evalSets": [{"name": "t", "format": "text", "path": "x"},
                                       {"name": "t", "format": "text", "path": "y"}]}},
     "spec.decontamination.evalSets", "evaluation set names ['t'] are used more than once"),
])
def test_duplicate_source_names_rejected(spec, field, text):
    error = rejection(document("Corpus", spec))
    assert error.field == field
    assert text in error.detail


def test_too_many_sources_rejected():
    sources = [{"name": f"s{index}", "format": "text", "path": "a.txt"} for index in range(10001)]
    error = rejection(document("Corpus", {"sources": sources}))
    assert error.field == "spec.sources"
    assert "at most 10000 items" in error.detail


def test_long_data_path_rejected():
    kind, _, change = DATA_PATH_FIELDS[0]
    error = rejection(with_data_path(kind, change, "a" * 2049))
    assert error.field == "spec.sources[0].path"
    assert "at most 2048 characters" in error.detail


def test_operator_names_metadata_field():
    """The operator builds ObjectMeta on its own, and its error still names metadata.name."""
    from pydantic import ValidationError

    from lathe.k8s.reconcile import parse

    body = document("Corpus", name="my.corpus")
    with pytest.raises(ValidationError) as raised:
        parse(body)
    field, message = loader.describe_errors(raised.value, "Corpus")
    assert field == "metadata.name"
    assert message.startswith("invalid value 'my.corpus': must be a DNS-1123 label")


@pytest.mark.parametrize(("metadata", "field", "hint"), [
    ({"labels": {"job-name": "other"}}, "spec.podMetadata.labels",
     "pod label key 'job-name' is set by Lathe or the Job controller"),
    ({"labels": {"batch.kubernetes.io/controller-uid": "x"}}, "spec.podMetadata.labels",
     "is set by Lathe or the Job controller"),
    ({"labels": {"lathe.dev/kind": "Other"}}, "spec.podMetadata.labels",
     "use a key of your own"),
    ({"labels": {"bad key": "a"}}, "spec.podMetadata.labels",
     "pod label key 'bad key' is not a Kubernetes label key"),
    ({"labels": {"team": "a b"}}, "spec.podMetadata.labels",
     "pod label value 'a b' of 'team' is not a Kubernetes label value"),
    ({"annotations": {"lathe.dev/repository-digest": "x"}}, "spec.podMetadata.annotations",
     "pod annotation key 'lathe.dev/repository-digest' is set by Lathe"),
])
def test_pod_metadata_keys_checked(metadata, field, hint):
    """Pod labels and annotations are valid Kubernetes keys, and none that Lathe or the Job
    controller find pods by, which would hide a stage's pods from both."""
    error = rejection(document("Corpus", {**SPECS["Corpus"], "podMetadata": metadata}))
    assert error.field == field
    assert hint in error.detail


def test_pod_metadata_of_own_keys_accepted():
    body = document("Tokenizer", {**SPECS["Tokenizer"], "podMetadata": {
        "labels": {"team": "nlp", "example.com/cost-center": "c-42"},
        "annotations": {"sidecar.istio.io/inject": "false", "note": "free text, any value"}}})
    assert loader.parse_resource(body, "resource.yaml").spec.pod_metadata.labels["team"] == "nlp"


def test_empty_pod_labels_accepted():
    """`labels:` with nothing after it is null in YAML, which the API server drops."""
    body = document("Corpus", {**SPECS["Corpus"], "podMetadata": {"labels": None}})
    assert loader.parse_resource(body, "resource.yaml").spec.pod_metadata.labels == {}


def _crd_rule_messages(kind: str, path: tuple[str, ...]) -> list[str]:
    """Return the messages of the CEL rules on the CRD field at `path` (wire names)."""
    from lathe import crdgen
    from lathe.api import KINDS

    node = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name in ("spec", *path):
        node = node["properties"][name]
    return [rule["message"] for rule in node["x-kubernetes-validations"]]


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("Corpus", ("storage", "uri"), "ftp://host/corpus"),
        ("PretrainJob", ("training", "artifactUri"), "fille:///x"),
        ("ModelDeployment", ("modelName",), "bad name!"),
        # Python's $ also matches before a final newline, and the API server's RE2 does not.
        ("ModelDeployment", ("modelName",), "ner\n"),
        ("PretrainJob", ("scheduling", "priorityClassName"), "Not_Valid"),
        ("PretrainJob", ("resources", "memory"), "4GB"),
        ("FineTune", ("resources", "cpu"), "2k"),
        ("Tokenizer", ("resources", "memory"), "0Gi"),
    ],
)
def test_string_rule_message_same_in_crd(kind, path, value):
    """`lathe run` and the API server reject a malformed string field with the same fix."""
    spec = copy.deepcopy(SPECS[kind])
    node = spec
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value
    error = rejection(document(kind, spec))
    assert error.field == "spec." + ".".join(path)
    assert repr(value) in error.detail
    assert any(message in error.detail for message in _crd_rule_messages(kind, path)), (
        error.detail)


@pytest.mark.parametrize(("kind", "spec", "field", "text"), [
    ("Corpus", {"pii": {"redact": ["email", "ssn", "email"]}},
     "spec.pii.redact", "'email' listed more than once; list each item once"),
    ("ModelDeployment", {"export": {"heldOutData": "ner/test.conll",
                                    "checkSequenceLengths": [20, 3, 20]}},
     "spec.export.checkSequenceLengths", "20 listed more than once; list each item once"),
])
def test_repeated_set_item_rejected(kind, spec, field, text):
    body = document(kind)
    body["spec"].update(spec)
    error = rejection(body)
    assert error.field == field
    assert text in error.detail
