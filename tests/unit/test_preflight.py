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


def test_data_directory_that_is_file_named(tmp_path):
    """A --data-dir that names a file exists, so the error does not say that it does not."""
    (tmp_path / "data.tar").write_text("x")
    with pytest.raises(InvalidResourceError, match=r"'notes.txt' is relative to the data "
                       r"directory, and '.*data.tar' is a file, not a folder; pass the folder"):
        preflight.check_files(parse(CORPUS), tmp_path / "data.tar")


def test_directory_as_source_named(data):
    (data / "folder").mkdir()
    body = {**CORPUS, "spec": {"sources": [{"name": "n", "format": "text", "path": "folder"}]}}
    with pytest.raises(InvalidResourceError, match=r"file 'folder' is a directory, not a file"):
        preflight.check_files(parse(body), data)


def test_missing_absolute_file_named(data):
    """An absolute path is not under the data directory, so the error does not say it is."""
    path = f"file://{data}/absent.txt"
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(parse(with_path(CORPUS, "sources", "path", path)), data)
    assert raised.value.detail == f"file {path!r} does not exist; fix the path."


def test_close_file_uri_suggested(data):
    """The name suggested for a mistyped file:// path is a file:/// URI too."""
    path = f"file://{data}/note.txt"
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(parse(with_path(CORPUS, "sources", "path", path)), data)
    assert raised.value.detail.endswith(f"(did you mean 'file://{data}/notes.txt'?).")


def test_percent_encoded_file_uri_explained(data):
    """file:// paths are literal, as in fsspec; an encoded space gets the path to write."""
    (data / "odd dir #1").mkdir()
    (data / "odd dir #1" / "notes.txt").write_text("x\n")
    path = f"file://{data}/odd%20dir%20%231/notes.txt"
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(parse(with_path(CORPUS, "sources", "path", path)), data)
    assert "without percent-decoding" in raised.value.detail
    assert f"'file://{data}/odd dir #1/notes.txt'" in raised.value.detail
    literal = f"file://{data}/odd dir #1/notes.txt"
    preflight.check_files(parse(with_path(CORPUS, "sources", "path", literal)), data)


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


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pubmed"
PUBTATOR_TEST = "pubmed/bc5cdr/CDR_TestSet.PubTator.txt"
CONLL_TEST = "pubmed/bc5cdr-ner/test.tsv"
PUBMEDQA = "pubmed/pubmedqa/ori_pqal.json"
NCBI_TEST = "pubmed/ncbi-disease/corpus/NCBItestset_corpus.txt"


def example(name: str) -> dict:
    """Return the first document of an example file, to modify in memory."""
    import yaml

    return next(doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc)


def test_examples_pass_content_checks(data_dir):
    resources = [parse(example(path.name)) for path in sorted(EXAMPLES.glob("*.yaml"))]
    preflight.check_resources(resources, data_dir)


@pytest.mark.parametrize(
    ("section", "index", "declared", "path", "suggested"),
    [
        ("sources", 0, "pubmedqa", None, "pubtator"),
        ("sources", 0, "conll", None, "pubtator"),
        ("sources", 6, "text", CONLL_TEST, "conll"),
        ("evalSets", 0, "text", None, "pubtator"),
        ("evalSets", 0, "jsonl", None, "pubtator"),
        ("sources", 6, "text", None, "pubmedqa"),
        ("sources", 6, "jsonl", None, "pubmedqa"),
        ("sources", 6, "pubmedqa", CONLL_TEST, "conll"),
    ],
)
def test_corpus_file_in_other_format_rejected(data_dir, section, index, declared, path,
                                              suggested):
    body = example("01-corpus.yaml")
    entries = (body["spec"]["sources"] if section == "sources"
               else body["spec"]["decontamination"]["evalSets"])
    entries[index]["format"] = declared
    if path:
        entries[index]["path"] = path
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(parse(body), data_dir)
    prefix = "spec.sources" if section == "sources" else "spec.decontamination.evalSets"
    assert raised.value.field == f"{prefix}[{index}].format"
    assert raised.value.resource == "Corpus/default/pubmed"
    assert repr(entries[index]["name"]) in raised.value.detail
    assert repr(entries[index]["path"]) in raised.value.detail
    assert f"has format {declared!r}" in raised.value.detail
    assert raised.value.detail.endswith(f"; use format: {suggested}.")


def test_ncbi_disease_source_accepted_as_pubtator(data_dir):
    """ncbiDisease files are PubTator text, so either format passes."""
    body = example("01-corpus.yaml")
    body["spec"]["sources"][5]["format"] = "pubtator"
    preflight.check_data_formats(parse(body), data_dir)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\t\r\n"])
@pytest.mark.parametrize(("section", "index", "role"),
                         [("sources", 1, "source"), ("evalSets", 0, "evaluation set")])
def test_empty_corpus_file_rejected(data_dir, tmp_path, content, section, index, role):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    body = example("01-corpus.yaml")
    entries = (body["spec"]["sources"] if section == "sources"
               else body["spec"]["decontamination"]["evalSets"])
    entries[index]["path"] = str(empty)
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(parse(body), data_dir)
    prefix = "spec.sources" if section == "sources" else "spec.decontamination.evalSets"
    assert raised.value.field == f"{prefix}[{index}].path"
    assert f"{role} {entries[index]['name']!r}" in raised.value.detail
    assert str(empty) in raised.value.detail
    assert "is empty" in raised.value.detail
    assert "remove the entry" in raised.value.detail


@pytest.mark.parametrize(
    ("name", "field", "edit"),
    [
        ("04-finetune.yaml", "spec.data.train", lambda spec, path: spec["data"].update(train=path)),
        ("04-finetune.yaml", "spec.data.validation",
         lambda spec, path: spec["data"].update(validation=path)),
        ("04-finetune.yaml", "spec.data.test", lambda spec, path: spec["data"].update(test=path)),
        ("05-deployment.yaml", "spec.export.heldOutData",
         lambda spec, path: spec["export"].update(heldOutData=path)),
    ],
)
def test_conll_file_in_other_format_rejected(data_dir, name, field, edit):
    body = example(name)
    edit(body["spec"], PUBTATOR_TEST)
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(parse(body), data_dir)
    assert raised.value.field == field
    assert repr(PUBTATOR_TEST) in raised.value.detail
    assert "read as format 'conll'" in raised.value.detail
    assert "looks like format 'pubtator'" in raised.value.detail
    assert "point it at a CoNLL file" in raised.value.detail


def test_pubmedqa_as_conll_rejected(data_dir):
    body = example("04-finetune.yaml")
    body["spec"]["data"]["train"] = PUBMEDQA
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(parse(body), data_dir)
    assert raised.value.field == "spec.data.train"
    assert "read as format 'conll'" in raised.value.detail
    assert "looks like format 'pubmedqa'" in raised.value.detail


def test_empty_conll_file_rejected(data_dir, tmp_path):
    empty = tmp_path / "train.tsv"
    empty.write_text("\n")
    body = example("04-finetune.yaml")
    body["spec"]["data"]["train"] = str(empty)
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(parse(body), data_dir)
    assert raised.value.field == "spec.data.train"
    assert f"file {str(empty)!r} is empty" in raised.value.detail


def test_content_checks_skip_missing_and_remote_files(data_dir):
    """A missing file is check_files' to report, and a remote one the stage's to download."""
    body = example("01-corpus.yaml")
    body["spec"]["sources"][0]["path"] = "pubmed/absent.txt"
    body["spec"]["sources"][1]["path"] = "s3://bucket/notes.txt"
    preflight.check_data_formats(parse(body), data_dir)


def _finetune_on_tsv_files():
    """Return a FineTune whose splits are train.tsv and test.tsv in the data directory."""
    return loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ner"},
        "spec": {"baseModel": {"pretrainJobRef": {"name": "lm"}},
                 "data": {"train": "train.tsv", "test": "test.tsv"}},
    }, "finetune.yaml")


def test_finetune_conll_lines_checked_before_run(tmp_path):
    """A FineTune split with a line the stage would reject fails validation, before the stages
    upstream of it have run."""
    from lathe import preflight

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("Ataxia\tB-Disease\nis\tO\n\nplain words without a tag\n")
    (data / "test.tsv").write_text("IL\tO\n")
    finetune = _finetune_on_tsv_files()
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(finetune, data)
    assert raised.value.field == "spec.data.train"
    assert raised.value.detail.startswith("train.tsv:4: expected `token<TAB>tag`, or columns "
                                          "separated by spaces that end with an IOB tag")
    assert raised.value.detail.endswith("; fix the file or the path.")


def test_finetune_iobes_tags_rejected_before_run(tmp_path):
    """A FineTune split tagged in another scheme than IOB, such as IOBES, fails validation as
    the stage would fail, while a ModelDeployment reads such held-out tags as they are."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text("Ataxia\tB-Disease\n\nGout\tS-Disease\nflares\tO\n")
    (data / "test.tsv").write_text("IL\tO\n")
    finetune = _finetune_on_tsv_files()
    deployment = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "ner"},
        "spec": {"model": {"fineTuneRef": {"name": "ner"}},
                 "export": {"heldOutData": "train.tsv"}},
    }, "deployment.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_data_formats(finetune, data)
    preflight.check_data_formats(deployment, data)

    assert raised.value.field == "spec.data.train"
    assert raised.value.detail.startswith("train.tsv:3: the tag 'S-Disease' is not `O`, ")
    assert "convert the file to IOB" in raised.value.detail


def test_single_slash_file_uri_explained(data):
    path = f"file:{data}/notes.txt"
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(parse(with_path(CORPUS, "sources", "path", path)), data)
    assert f"write 'file://{data}/notes.txt'" in raised.value.detail


def test_uppercase_scheme_explained(data):
    body = with_path(CORPUS, "sources", "path", f"FILE://{data}/notes.txt")
    with pytest.raises(InvalidResourceError) as raised:
        parse(body)
    assert f"write it in lowercase, as file://{data}/notes.txt" in raised.value.detail
