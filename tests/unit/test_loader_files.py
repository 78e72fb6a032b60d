"""Malformed resource files get an InvalidResourceError that names the file, never a traceback."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lathe import loader
from lathe.errors import InvalidResourceError, InvalidResourcesError

TOKENIZER = """\
apiVersion: lathe.dev/v1alpha1
kind: Tokenizer
metadata:
  name: tok
spec:
  corpusRef: {name: pubmed}
"""

PVC = """\
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: lathe-artifacts}
spec:
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 100Gi}}
"""

CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {level: debug}
"""

EXAMPLES = Path(__file__).parents[2] / "examples" / "pubmed"


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
    assert str(raised.value).startswith(f"{path}: invalid YAML at line 8")
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


def test_kustomization_skipped_with_warning(tmp_path, caplog):
    """A kustomization.yaml beside the resources is skipped, and the warning points to
    `kubectl apply -k`, which reads it."""
    write(tmp_path, TOKENIZER, "tokenizer.yaml")
    kustomization = write(tmp_path, "apiVersion: kustomize.config.k8s.io/v1beta1\n"
                          "kind: Kustomization\nresources: [tokenizer.yaml]\n",
                          "kustomization.yaml")
    with caplog.at_level(logging.WARNING, logger="lathe.loader"):
        resources = loader.load_paths([tmp_path])
    assert [resource.key for resource in resources] == ["Tokenizer/default/tok"]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith(f"skipped Kustomization <unnamed> in {kustomization}: apiVersion "
                              "'kustomize.config.k8s.io/v1beta1' is not a Lathe API version")
    assert warning.endswith(f"kustomize reads it with `kubectl apply -k {tmp_path}`.")


@pytest.mark.parametrize("content", ["", "# only a comment\n", "---\n---\n"])
def test_empty_file_in_folder_warned(tmp_path, caplog, content):
    """A file emptied by mistake drops its stages, so it is named in a warning."""
    write(tmp_path, TOKENIZER, "tokenizer.yaml")
    empty = write(tmp_path, content, "deployment.yaml")
    with caplog.at_level(logging.WARNING, logger="lathe.loader"):
        resources = loader.load_paths([tmp_path])
    assert [resource.key for resource in resources] == ["Tokenizer/default/tok"]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning == (f"skipped {empty}: it contains no YAML documents (it is empty or only "
                       "comments); add its resources or leave it out.")


def test_only_empty_files_rejected(tmp_path):
    empty = write(tmp_path, "# nothing yet\n", "deployment.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([empty])
    assert raised.value.field == "-f"
    assert raised.value.detail == ("no resources found, because every file is empty or only "
                                   "comments; add lathe.dev/v1alpha1 resources to them.")


def test_file_named_twice_read_once(tmp_path):
    path = write(tmp_path, TOKENIZER, "tokenizer.yaml")
    resources = loader.load_paths([tmp_path, path])
    assert len(resources) == 1


def test_other_api_groups_skipped_with_warning(tmp_path, caplog):
    """A PersistentVolumeClaim and a ConfigMap kept beside the examples for `kubectl apply -f`
    are skipped, with one warning each that names the kind, name and file."""
    shutil.copytree(EXAMPLES, tmp_path, dirs_exist_ok=True)
    pvc = write(tmp_path, PVC, "pvc.yaml")
    config_map = write(tmp_path, CONFIG_MAP, "settings.yaml")
    with caplog.at_level(logging.WARNING, logger="lathe.loader"):
        resources = loader.load_paths([tmp_path])
    assert len(resources) == 5
    assert all(resource.api_version == "lathe.dev/v1alpha1" for resource in resources)
    assert [record.levelno for record in caplog.records] == [logging.WARNING] * 2
    first, second = [record.getMessage() for record in caplog.records]
    assert first == (f"skipped PersistentVolumeClaim 'lathe-artifacts' in {pvc}: apiVersion 'v1' "
                     "is not a Lathe API version, and lathe reads only lathe.dev/v1alpha1 "
                     f"resources; create it with `kubectl apply -f {pvc}`.")
    assert second.startswith(f"skipped ConfigMap 'settings' in {config_map}: apiVersion 'v1'")


def test_other_api_group_in_stdin_skipped(monkeypatch, caplog):
    monkeypatch.setattr("sys.stdin", io.StringIO(CONFIG_MAP + "---\n" + TOKENIZER))
    with caplog.at_level(logging.WARNING, logger="lathe.loader"):
        resources = loader.load_paths([Path("-")])
    assert [resource.key for resource in resources] == ["Tokenizer/default/tok"]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("skipped ConfigMap 'settings' in standard input:")
    assert warning.endswith("create it with kubectl apply.")


@pytest.mark.parametrize(("count", "skipped"), [(1, "1 non-Lathe resource was skipped"),
                                                (2, "2 non-Lathe resources were skipped")])
def test_only_other_api_groups_counted(tmp_path, count, skipped):
    write(tmp_path, PVC, "pvc.yaml")
    if count == 2:
        write(tmp_path, CONFIG_MAP, "settings.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([tmp_path])
    assert raised.value.field == "-f"
    assert raised.value.detail.startswith(f"no resources found, and {skipped} (see the warnings "
                                          "above)")


@pytest.mark.parametrize(("api_version", "kind", "field", "fix"), [
    ("lathe.dev/v1", "Tokenizer", "apiVersion", "set it to 'lathe.dev/v1alpha1'."),
    ("lathe.dev/v1alpha1", "Tokenzier", "kind", "unknown kind 'Tokenzier'"),
    # A Lathe kind with a misspelled group is a Lathe resource, not another group's manifest.
    ("lathe.dv/v1alpha1", "Tokenizer", "apiVersion", "set it to 'lathe.dev/v1alpha1'."),
    ("lathe/v1alpha1", "Tokenizer", "apiVersion", "set it to 'lathe.dev/v1alpha1'."),
    ("v1alpha1", "Tokenizer", "apiVersion", "set it to 'lathe.dev/v1alpha1'."),
])
def test_lathe_group_mistakes_still_rejected(tmp_path, caplog, api_version, kind, field, fix):
    write(tmp_path, PVC, "pvc.yaml")
    text = TOKENIZER.replace("lathe.dev/v1alpha1", api_version).replace("Tokenizer", kind)
    path = write(tmp_path, text, "tokenizer.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([tmp_path])
    assert type(raised.value) is InvalidResourceError
    assert raised.value.resource == f"{kind}/default/tok (in {path})"
    assert raised.value.field == field
    assert fix in raised.value.detail
    assert [record.getMessage().split(" in ")[0] for record in caplog.records] == [
        "skipped PersistentVolumeClaim 'lathe-artifacts'"]


def test_parse_resource_rejects_other_api_group():
    """parse_resource, which reads one known resource, still rejects another group's manifest."""
    import yaml

    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(yaml.safe_load(CONFIG_MAP), "settings.yaml")
    assert raised.value.field == "apiVersion"
    assert raised.value.detail.startswith("'v1' is not a Lathe API version, so this is not a "
                                          "Lathe resource")
    assert raised.value.detail.endswith("Apply it with kubectl apply instead.")


def _examples_with_errors(tmp_path: Path) -> Path:
    """Copy the examples with an unknown field in 02-tokenizer.yaml and a negative maxSteps in
    03-pretrain.yaml."""
    shutil.copytree(EXAMPLES, tmp_path, dirs_exist_ok=True)
    tokenizer = tmp_path / "02-tokenizer.yaml"
    tokenizer.write_text(re.sub(r"(?m)^  vocabSize:", "  vocabSze:", tokenizer.read_text()))
    pretrain = tmp_path / "03-pretrain.yaml"
    pretrain.write_text(re.sub(r"maxSteps: \d+", "maxSteps: -5", pretrain.read_text()))
    return tmp_path


def test_every_invalid_file_reported(tmp_path):
    folder = _examples_with_errors(tmp_path)
    with pytest.raises(InvalidResourcesError) as raised:
        loader.load_paths([folder])
    tokenizer, pretrain = raised.value.errors
    assert tokenizer.resource == f"Tokenizer/default/pubmed (in {folder / '02-tokenizer.yaml'})"
    assert tokenizer.field == "spec.vocabSze"
    assert pretrain.resource == f"PretrainJob/default/pubmed-lm (in {folder / '03-pretrain.yaml'})"
    assert pretrain.detail == "invalid value -5: must be at least 1; set 1 or more."
    assert str(raised.value).splitlines() == [
        "2 errors in the resource files; fix each of them:", f"  {tokenizer}", f"  {pretrain}"]
    # Callers that handle one InvalidResourceError see the first error's parts.
    assert isinstance(raised.value, InvalidResourceError)
    assert raised.value.resource == tokenizer.resource
    assert raised.value.field == "spec.vocabSze"


def test_every_invalid_document_and_path_reported(tmp_path):
    """A missing path, a file that is not YAML and every invalid document of a file are all
    reported, each once."""
    write(tmp_path, TOKENIZER.replace("name: tok", "name: one") + "  vocabSize: 1\n---\n"
          + TOKENIZER.replace("name: tok", "name: two") + "---\n"
          + TOKENIZER.replace("name: tok", "name: three") + "  vocabSize: x\n", "a.yaml")
    broken = write(tmp_path, TOKENIZER + "  vocabSize: [8000\n", "b.yaml")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(InvalidResourcesError) as raised:
        loader.load_paths([missing, tmp_path])
    resources = [error.resource for error in raised.value.errors]
    assert resources == [str(missing), f"Tokenizer/default/one (in {tmp_path / 'a.yaml'})",
                         f"Tokenizer/default/three (in {tmp_path / 'a.yaml'})", str(broken)]
    assert [error.field for error in raised.value.errors] == [
        "-f", "spec.vocabSize", "spec.vocabSize", ""]
    assert len(str(raised.value).splitlines()) == 5


def test_single_error_not_wrapped(tmp_path):
    """One error keeps its own type and text, with no count line."""
    path = write(tmp_path, TOKENIZER + "  vocabSize: 1\n")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert type(raised.value) is InvalidResourceError
    assert str(raised.value) == (f"Tokenizer/default/tok (in {path}): spec.vocabSize: invalid "
                                 "value 1: must be at least 512; set 512 or more.")


def test_duplicates_checked_after_parse_errors(tmp_path):
    """A duplicate name is reported only once every file parses, and then every duplicate is."""
    write(tmp_path, TOKENIZER, "a.yaml")
    write(tmp_path, TOKENIZER, "b.yaml")
    write(tmp_path, TOKENIZER.replace("name: tok", "name: other"), "c.yaml")
    invalid = write(tmp_path, TOKENIZER.replace("name: tok", "name: other") + "  x: 1\n",
                    "d.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([tmp_path])
    assert type(raised.value) is InvalidResourceError
    assert raised.value.field == "spec.x"
    invalid.write_text(TOKENIZER.replace("name: tok", "name: other"))
    with pytest.raises(InvalidResourcesError) as raised:
        loader.load_paths([tmp_path])
    assert [error.resource for error in raised.value.errors] == [
        f"Tokenizer/default/tok (in {tmp_path / 'b.yaml'})",
        f"Tokenizer/default/other (in {tmp_path / 'd.yaml'})"]
    assert all("defined twice" in error.detail for error in raised.value.errors)


def test_cli_prints_warnings_and_every_error(tmp_path):
    """`lathe validate` prints each skipped manifest as a warning and each error on its own
    line, on stderr."""
    folder = _examples_with_errors(tmp_path)
    write(folder, PVC, "pvc.yaml")
    completed = subprocess.run(
        [sys.executable, "-m", "lathe.cli", "validate", "-f", str(folder)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.splitlines()
    assert lines[0].startswith("WARNING lathe.loader: skipped PersistentVolumeClaim "
                               f"'lathe-artifacts' in {folder / 'pvc.yaml'}")
    assert lines[1] == "error: 2 errors in the resource files; fix each of them:"
    assert lines[2].startswith("  Tokenizer/default/pubmed")
    assert lines[3].startswith("  PretrainJob/default/pubmed-lm")
    assert len(lines) == 4


@pytest.mark.parametrize(("text", "found"), [
    ("- a\n- b\n", "a list of 2 items"),
    ("just some text\n", "plain text ('just some text')"),
    ("42\n", "an integer (42)"),
])
def test_non_mapping_document_located(tmp_path, text, found):
    """A document that is not a mapping is named by its number and line in the file, with what
    it is, instead of a "(document)" placeholder."""
    path = write(tmp_path, TOKENIZER + "---\n# the second resource\n" + text)
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_file(path)
    message = str(raised.value)
    assert raised.value.resource == f"{path}, document 2 (line 9)"
    assert "(document)" not in message
    assert f"found {found}" in message
    assert "a mapping with apiVersion, kind, metadata and spec" in message


def test_duplicate_in_one_file_located(tmp_path):
    """The same resource twice in one file names both documents and their lines."""
    path = write(tmp_path, TOKENIZER + "---\n" + TOKENIZER)
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert raised.value.field == "metadata.name"
    assert raised.value.resource == f"Tokenizer/default/tok (in {path})"
    assert "document 2 (line 8)" in raised.value.detail
    assert "document 1 (line 1)" in raised.value.detail
    assert "give each resource its own" in raised.value.detail
