"""The checks `lathe validate` and `lathe run` make on data paths before a stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lathe import loader, preflight
from lathe.errors import InvalidResourceError

CORPUS = {
    "apiVersion": "lathe.dev/v1alpha1",
    "kind": "Corpus",
    "metadata": {"name": "pubmed"},
    "spec": {"sources": [{"name": "notes", "format": "text", "path": "notes.txt"}]},
}
FINETUNE = {
    "apiVersion": "lathe.dev/v1alpha1",
    "kind": "FineTune",
    "metadata": {"name": "ner"},
    "spec": {"baseModel": {"uri": "model"}, "data": {"train": "train.tsv", "test": "test.tsv"}},
}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    for name in ("notes.txt", "train.tsv", "test.tsv"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path


def parse(body: dict) -> object:
    return loader.parse_resource(body, "resource.yaml")


def test_local_files_pass(data):
    preflight.check_files(parse(CORPUS), data)
    preflight.check_files(parse(FINETUNE), data)


def with_path(body: dict, section: str, key: str, path: str) -> dict:
    """Copy a resource body with spec[section][key] set to path (sources: the first source)."""
    spec = dict(body["spec"])
    if section == "sources":
        spec["sources"] = [{**spec["sources"][0], key: path}]
    else:
        spec[section] = {**spec[section], key: path}
    return {**body, "spec": spec}


@pytest.mark.parametrize(
    ("body", "section", "key", "field", "path"),
    [
        (CORPUS, "sources", "path", "spec.sources[0].path", "pvc://data/pubmed/notes.txt"),
        (FINETUNE, "data", "test", "spec.data.test", "pvc://data/conll/test.tsv"),
        (FINETUNE, "baseModel", "uri", "spec.baseModel.uri", "pvc://models/lm/model"),
    ],
)
def test_pvc_data_path_needs_cluster(data, body, section, key, field, path):
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(parse(with_path(body, section, key, path)), data)
    assert raised.value.field == field
    assert repr(path) in raised.value.detail
    assert "exists only in a cluster" in raised.value.detail
    assert "lathe run" in raised.value.detail


def test_s3_data_path_not_downloaded(data):
    """A file on an object store is left to the stage, which downloads it."""
    preflight.check_files(parse(with_path(CORPUS, "sources", "path", "s3://bucket/a.txt")), data)


def test_missing_data_directory_named(tmp_path):
    with pytest.raises(InvalidResourceError, match=r"'notes.txt' is relative to the data "
                       r"directory, and '.*absent' does not exist; pass the folder"):
        preflight.check_files(parse(CORPUS), tmp_path / "absent")


def test_directory_as_source_named(data):
    (data / "folder").mkdir()
    body = {**CORPUS, "spec": {"sources": [{"name": "n", "format": "text", "path": "folder"}]}}
    with pytest.raises(InvalidResourceError, match=r"file 'folder' is a directory, not a file"):
        preflight.check_files(parse(body), data)


def test_data_digests_cover_files_and_base_model(data):
    finetune = parse(FINETUNE)
    first = preflight.data_digests(finetune, data)
    assert set(first) == {"spec.data.train", "spec.data.test", "spec.baseModel.uri"}

    # A model rewritten in place under the same path changes the stage key.
    (data / "model" / "config.json").write_text('{"hidden_size": 64}')
    second = preflight.data_digests(finetune, data)
    assert second["spec.baseModel.uri"] != first["spec.baseModel.uri"]
    assert second["spec.data.train"] == first["spec.data.train"]


def test_data_digests_skip_object_stores(data):
    body = {**CORPUS, "spec": {"sources": [
        {"name": "notes", "format": "text", "path": "notes.txt"},
        {"name": "remote", "format": "text", "path": "s3://bucket/notes.txt"},
    ]}}
    assert set(preflight.data_digests(parse(body), data)) == {"spec.sources[0].path"}


def test_missing_base_model_rejected_before_run(data):
    (data / "model" / "config.json").unlink()
    (data / "model").rmdir()
    with pytest.raises(InvalidResourceError, match=r"spec.baseModel.uri: model directory "
                       r"'.*model' does not exist"):
        preflight.check_files(parse(FINETUNE), data)


def test_pvc_artifact_uri_rejected_for_lathe_run(data):
    body = {"apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "lm"},
            "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                     "training": {"artifactUri": "pvc://claim/ckpt"}}}
    with pytest.raises(InvalidResourceError, match=r"spec.training.artifactUri: 'pvc://claim/"
                       r"ckpt' names a PersistentVolumeClaim"):
        preflight.check_files(parse(body), data)
