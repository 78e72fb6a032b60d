"""Malformed resource files get an InvalidResourceError that names the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe import loader
from lathe.errors import InvalidResourceError

TOKENIZER = """\
apiVersion: lathe.dev/v1alpha1
kind: Tokenizer
metadata:
  name: tok
spec:
  corpusRef: {name: pubmed}
"""


def write(tmp_path: Path, content: str | bytes, name: str = "resource.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("kind", ["[Tokenizer]", "{a: 1}", "7", "''"])
def test_kind_not_a_string_rejected(tmp_path, kind):
    path = write(tmp_path, TOKENIZER.replace("kind: Tokenizer", f"kind: {kind}"))
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert raised.value.field == "kind"
    assert str(path) in str(raised.value)
    assert "Corpus, Tokenizer" in raised.value.detail


def test_non_utf8_file_rejected(tmp_path):
    path = write(tmp_path, b"\xff\xfe bad")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert raised.value.resource == str(path)
    assert "UTF-8" in raised.value.detail
    assert "0xff" in raised.value.detail


def test_yaml_error_names_file(tmp_path):
    path = write(tmp_path, TOKENIZER + "  vocabSize: [8000\n")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert "<unicode string>" not in str(raised.value)
    # The path is named once, as the error's resource, and not again in the detail.
    assert str(raised.value).startswith(f"{path}: (file): invalid YAML at line 8")
    assert str(path) not in raised.value.detail


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (TOKENIZER.replace("  name: tok\n", "  name: tok\n  name: other\n"), "name", 5),
        (TOKENIZER + "  vocabSize: 8000\n  vocabSize: 9000\n", "vocabSize", 8),
        (TOKENIZER.replace("{name: pubmed}", "{name: pubmed, name: other}"), "name", 6),
    ],
)
def test_duplicate_key_rejected(tmp_path, text, key, line):
    path = write(tmp_path, text)
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert f"duplicate key {key!r}" in raised.value.detail
    assert f"invalid YAML at line {line}" in raised.value.detail
    assert str(raised.value).startswith(str(path))


def test_merge_key_override_allowed(tmp_path):
    """A key that overrides one merged in with `<<` is standard YAML, not a duplicate."""
    path = write(tmp_path, TOKENIZER + "  resources:\n    <<: {cpu: '4', memory: 8Gi}\n"
                 "    cpu: '8'\n")
    (resource,) = loader.load_paths([path])
    assert resource.spec.resources.cpu == "8"
    assert resource.spec.resources.memory == "8Gi"


def test_control_character_names_file(tmp_path):
    path = write(tmp_path, TOKENIZER.replace("name: tok", 'name: "to\x01k"'))
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert "<unicode string>" not in str(raised.value)
    assert "U+0001" in raised.value.detail
    assert str(raised.value).startswith(str(path))


def test_json_manifest_in_folder_loaded(tmp_path):
    """kubectl applies .json manifests from a folder, and so does lathe."""
    import json

    import yaml

    write(tmp_path, json.dumps(yaml.safe_load(TOKENIZER)), "tokenizer.json")
    resources = loader.load_paths([tmp_path])
    assert [resource.key for resource in resources] == ["Tokenizer/default/tok"]


def test_other_api_group_named_not_lathe(tmp_path):
    """A kustomization.yaml beside the resources is named as a non-Lathe file, not asked to
    change its apiVersion to Lathe's."""
    write(tmp_path, TOKENIZER, "tokenizer.yaml")
    write(tmp_path, "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
          "resources: [tokenizer.yaml]\n", "kustomization.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([tmp_path])
    assert raised.value.field == "apiVersion"
    assert "'kustomize.config.k8s.io/v1beta1' is not a Lathe API version" in raised.value.detail
    assert "Remove the file from the folder" in raised.value.detail


def test_file_named_twice_read_once(tmp_path):
    path = write(tmp_path, TOKENIZER, "tokenizer.yaml")
    resources = loader.load_paths([tmp_path, path])
    assert len(resources) == 1
