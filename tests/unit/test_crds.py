"""The CRDs in crds/ are generated from the API models and stay in step with them."""

from __future__ import annotations

import pytest
import yaml

from lathe import crdgen
from lathe.api import KINDS

REQUIRED_SHORT_NAMES = {
    "Corpus": "corp", "Tokenizer": "tok", "PretrainJob": "ptj", "FineTune": "ft",
    "ModelDeployment": "mdep",
}


def test_committed_crds_match_generator():
    """Fails when someone changed an API model without running `make crds`."""
    for name, text in crdgen.render_all().items():
        committed = (crdgen.CRD_DIR / name).read_text()
        assert committed == text, f"crds/{name} is stale; run `make crds`."


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_has_names_status_and_columns(kind):
    crd = crdgen.crd(KINDS[kind])
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["names"]["shortNames"] == [REQUIRED_SHORT_NAMES[kind]]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Phase", "Age"}


def _walk(node, path="$"):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural(kind):
    """Every node has a type (or preserves unknown fields, or is int-or-string), and no JSON
    Schema-only keyword."""
    schema = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        untyped = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"
        )
        assert "type" in node or untyped, path
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title"} & node.keys(), path
        assert node.get("default", {}) is not None, path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_spec_fields_have_descriptions(kind):
    schema = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema["properties"]["spec"], "spec"):
        if path.endswith(("[]", "{}")) and node.get("type") != "object":
            continue  # a list or map of scalars is described by its field
        assert node.get("description"), f"{kind} {path} has no description"


@pytest.mark.parametrize("field", ["cpu", "memory", "shmSize"])
def test_quantity_is_int_or_string(field):
    """A quantity takes `cpu: 2` as well as `cpu: 500m`, as in a pod spec."""
    schema = crdgen.crd(KINDS["PretrainJob"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = schema["properties"]["spec"]["properties"]["resources"]["properties"][field]
    assert node["x-kubernetes-int-or-string"] is True
    assert "type" not in node
    assert "x-kubernetes-preserve-unknown-fields" not in node
    assert [rule["rule"].startswith("type(self) == int")
            for rule in node["x-kubernetes-validations"]] == [True, True]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_string_checks_are_rules_with_messages(kind):
    """No field uses the schema's `pattern`, because the API server rejects a mismatch by
    printing the regular expression. A CEL rule does the check, with a message that names the
    fix. A field whose rule runs a regular expression has a maxLength, which bounds the rule's
    estimated cost."""
    schema = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "pattern" not in node, path
        for rule in node.get("x-kubernetes-validations", ()):
            if "matches(" in rule["rule"] and path.startswith("$.spec"):
                assert "maxLength" in node, (path, rule)
                assert rule.get("message") or rule.get("messageExpression"), (path, rule)


def test_yaml_round_trips():
    for text in crdgen.render_all().values():
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def _rules(node, path="$"):
    for rule in node.get("x-kubernetes-validations", ()):
        yield path, rule
    for key, child in (node.get("properties") or {}).items():
        yield from _rules(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _rules(node["items"], f"{path}[]")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rule_field_paths_exist(kind):
    """A CEL rule's fieldPath names a property of the object the rule is on."""
    schema = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = dict(_walk(schema))
    for path, rule in _rules(schema):
        if "fieldPath" in rule:
            assert f"{path}{rule['fieldPath']}" in nodes, (path, rule)


def test_sequence_length_rule_names_field():
    schema = crdgen.crd(KINDS["PretrainJob"])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = schema["properties"]["spec"]["x-kubernetes-validations"]
    (rule,) = [rule for rule in rules if "sequenceLength" in rule["rule"]]
    assert rule["fieldPath"] == ".sequenceLength"


def _default_text(value) -> str:
    """Write a schema default as a description states it: `true`, `0.05`, `ner`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_stated_defaults_match_schema():
    """A description that ends in `Default: X.` states the default the schema applies, because
    `kubectl explain` shows descriptions but not defaults."""
    stated = 0
    for kind, model in KINDS.items():
        schema = crdgen.crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            description = node.get("description", "")
            if "default" not in node or "Default: " not in description:
                continue
            text = description.rsplit("Default: ", 1)[1].removesuffix(".")
            assert text == _default_text(node["default"]), f"{kind} {path}"
            stated += 1
    assert stated >= 20
