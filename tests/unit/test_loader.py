"""Resource files are read into API models, and bad input gets a message with the fix."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
import yaml

from lathe import loader
from lathe.errors import InvalidResourceError, InvalidResourcesError, raise_errors
from lathe.graph import order
from lathe.local.runner import LocalRunner

CORPUS = """
apiVersion: lathe.dev/v1alpha1
kind: Corpus
metadata: {name: pubmed}
spec:
  sources:
  - {name: ncbi, format: ncbiDisease, path: pubmed/ncbi-disease/corpus/NCBItrainset_corpus.txt}
"""

TOKENIZER = """
apiVersion: lathe.dev/v1alpha1
kind: Tokenizer
metadata: {name: tok}
spec:
  corpusRef: {name: pubmed}
"""


def write(tmp_path: Path, text: str, name: str = "resource.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_folder_in_dependency_order(tmp_path):
    write(tmp_path, TOKENIZER, "a.yaml")
    write(tmp_path, CORPUS, "b.yaml")
    resources = order(loader.load_paths([tmp_path]))
    assert [r.kind for r in resources] == ["Corpus", "Tokenizer"]


@pytest.mark.parametrize(
    ("text", "field", "fix"),
    [
        (CORPUS.replace("spec:", "spec:\n  shardz: 3"), "spec.shardz", "did you mean 'shards'?"),
        (CORPUS.replace("format: ncbiDisease", "format: pdf"), "spec.sources[0].format",
         "must be one of 'pubtator', .*; use one of them"),
        (CORPUS.replace("format: ncbiDisease", "format: ncbidisease"), "spec.sources[0].format",
         "did you mean 'ncbiDisease'"),
        (TOKENIZER.replace("corpusRef:", "vocabSize: 100\n  corpusRef:"), "spec.vocabSize",
         "invalid value 100: must be at least 512; set 512 or more"),
        (CORPUS.replace("lathe.dev/v1alpha1", "lathe.dev/v1"), "apiVersion", "set it to"),
        (CORPUS.replace("kind: Corpus", "kind: Corpse"), "kind", "use one of"),
        (TOKENIZER.replace("corpusRef: {name: pubmed}", "vocabSize: 1000"), "spec.corpusRef",
         "add it"),
        (TOKENIZER + "  specialTokens: ['<|endoftext|>', '<pad>', '<unk>', '<pad>']\n",
         "spec.specialTokens", "^(?!.*\\[).*'<pad>' listed more than once; list each token once"),
        (TOKENIZER + "  specialTokens: ['<|endoftext|>', ' ', '<pad>', '<unk>']\n",
         "spec.specialTokens", "entry 1 is blank"),
        (TOKENIZER + "  specialTokens: ['<|endoftext|>']\n", "spec.specialTokens",
         "'<pad>', '<unk>' missing; add them"),
        (CORPUS.replace("name: pubmed", "name: PubMed"), "metadata.name",
         "rename it, for example to 'pubmed'"),
    ],
)
def test_invalid_resource_names_field_and_fix(tmp_path, text, field, fix):
    path = write(tmp_path, text)
    with pytest.raises(InvalidResourceError, match=fix) as raised:
        loader.load_paths([path])
    assert raised.value.field == field
    assert str(path) in str(raised.value)


def test_missing_reference_names_field(tmp_path):
    write(tmp_path, TOKENIZER.replace("name: pubmed", "name: nothere"))
    write(tmp_path, CORPUS, "corpus.yaml")
    with pytest.raises(InvalidResourceError, match="not defined") as raised:
        order(loader.load_paths([tmp_path]))
    assert raised.value.field == "spec.corpusRef.name"
    assert "Tokenizer/default/tok" in str(raised.value)
    assert f"(in {tmp_path / 'resource.yaml'})" in str(raised.value)


def test_missing_data_file_names_field(tmp_path, data_dir):
    write(tmp_path, CORPUS.replace("NCBItrainset", "NCBIplanset"))
    runner = LocalRunner(tmp_path / "ws", data_dir)
    with pytest.raises(InvalidResourceError, match="does not exist") as raised:
        runner.check(loader.load_paths([tmp_path]))
    assert raised.value.field == "spec.sources[0].path"


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(InvalidResourceError, match="does not exist"):
        loader.load_paths([tmp_path / "nothing.yaml"])


def test_duplicate_names_are_rejected(tmp_path):
    write(tmp_path, CORPUS)
    write(tmp_path, CORPUS, "again.yaml")
    with pytest.raises(InvalidResourceError, match="defined twice") as raised:
        loader.load_paths([tmp_path])
    assert str(tmp_path / "again.yaml") in str(raised.value)
    assert str(tmp_path / "resource.yaml") in str(raised.value)


def test_empty_folder_is_rejected(tmp_path):
    with pytest.raises(InvalidResourceError, match="no resources found"):
        loader.load_paths([tmp_path])


@pytest.mark.parametrize(
    ("example", "edit", "field"),
    [
        ("05-deployment.yaml", lambda spec: spec["export"].update(heldOutData="conll/tset.tsv"),
         "spec.export.heldOutData"),
        ("02-tokenizer.yaml",
         lambda spec: spec["protectedPatterns"][0].update(vocabularyFile="icd10/none.csv"),
         "spec.protectedPatterns[0].vocabularyFile"),
    ],
)
def test_missing_data_file_named(tmp_path, data_dir, example, edit, field):
    """`lathe validate` and `lathe run` check every data file a spec names, not only sources."""
    import yaml

    from lathe import preflight

    document = next(doc for doc in yaml.safe_load_all(
        (Path(__file__).parents[2] / "examples" / "pubmed" / example).read_text()) if doc)
    edit(document["spec"])
    resource = loader.parse_resource(document, example)
    with pytest.raises(InvalidResourceError) as raised:
        preflight.check_files(resource, data_dir)
    assert raised.value.field == field
    assert "does not exist under the data directory" in str(raised.value)
    assert "--data-dir" in str(raised.value)


def test_misspelled_metadata_field_rejected():
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus",
                "metadata": {"name": "x", "namspace": "team-a"}, "spec": {"sources": []}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "corpus.yaml")
    assert raised.value.field == "metadata.namspace"
    assert "fix its spelling" in raised.value.detail


def test_every_spec_error_listed():
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Tokenizer", "metadata": {"name": "x"},
                "spec": {"corpusRef": {"name": "c"}, "vocabSzie": 10, "minFrequency": -1,
                         "specialTokens": 3}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "tokenizer.yaml")
    message = str(raised.value)
    assert "vocabSzie" in message
    assert "spec.minFrequency" in message
    assert "spec.specialTokens" in message
    assert message.startswith("3 errors in the resource files; fix each of them:\n"), message
    lines = message.splitlines()[1:]
    assert len(lines) == 3, lines
    assert all(line.startswith("  Tokenizer/default/x (in tokenizer.yaml): spec.")
               for line in lines), lines


def test_errors_of_two_resources_flattened():
    """Two resources, one with two invalid fields: one list of three lines, none nested."""
    documents = [
        {"apiVersion": "lathe.dev/v1alpha1", "kind": "Tokenizer", "metadata": {"name": "x"},
         "spec": {"corpusRef": {"name": "c"}, "vocabSzie": 10, "minFrequency": -1}},
        {"apiVersion": "lathe.dev/v1alpha1", "kind": "Tokenizer", "metadata": {"name": "y"},
         "spec": {"corpusRef": {"name": "c"}, "minFrequency": -1}},
    ]
    errors = []
    for document in documents:
        try:
            loader.parse_resource(document, "tokenizer.yaml")
        except InvalidResourceError as error:
            errors.append(error)
    with pytest.raises(InvalidResourcesError) as raised:
        raise_errors(errors)
    assert len(raised.value.errors) == 3
    assert str(raised.value).startswith("3 errors in the resource files")
    assert "errors in the resource files" not in str(raised.value).split("\n", 1)[1]


@pytest.mark.parametrize("metadata", ["just-a-name", ["x"], {"name": "x", 1: "y", "zz": 2}])
def test_malformed_metadata_gets_error(metadata):
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": metadata,
                "spec": {"sources": []}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "corpus.yaml")
    assert raised.value.field.startswith("metadata")


def test_stage_error_keeps_every_line():
    """A StageError that spans lines, such as one that embeds a pydantic ValidationError, is
    quoted whole, and only the last one counts."""
    from lathe.local.runner import _stage_error

    log = ("error: Corpus default/x: spec.sources: an earlier attempt\n"
           "INFO step 3\n"
           "error: Corpus default/x: spec: 1 validation error for CorpusSpec\n"
           "sources.0.path\n  Field required\n")
    assert _stage_error(log) == ("Corpus default/x: spec: 1 validation error for CorpusSpec\n"
                                 "sources.0.path\n  Field required")
    assert _stage_error("Traceback (most recent call last):\n") == ""


def test_stage_error_ends_before_torchrun_report():
    """Under torchrun the StageError of each process comes before torchrun's report of the
    failed workers, which is not part of the message."""
    from lathe.local.runner import _stage_error

    message = ("FineTune default/ner: spec.baseModel.uri: config.json is missing in "
               "'/nonexistent/model'; finish the PretrainJob first.")
    log = (f"2026-12-05 09:00:01,000 lathe_trainer.finetune.stage Loading the base model.\n"
           f"error: {message}\n"
           f"error: {message}\n"
           "E1205 09:00:02.000000 123 torch/distributed/elastic/multiprocessing/api.py:874] "
           "failed (exitcode: 42) local_rank: 0\n"
           "Traceback (most recent call last):\n"
           '  File "/venv/bin/torchrun", line 8, in <module>\n'
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
           "============================================================\n"
           "lathe_trainer FAILED\n" + "\n".join(f"  line {i}" for i in range(40)) + "\n")
    assert _stage_error(log) == message


@pytest.mark.parametrize(("spec", "field", "hint"), [
    ({"shardz": 2}, "spec.shardz", "did you mean 'shards'?"),
    ({"dedup": {"near": {"treshold": 0.5}}}, "spec.dedup.near.treshold",
     "did you mean 'threshold'?"),
    ({"sources": [{"name": "a", "format": "text", "path": "x", "fromat": "text"}]},
     "spec.sources[0].fromat", "did you mean 'format'?"),
    ({"zzz": 1}, "spec.zzz", "remove it or fix its spelling."),
    # With no close name, a short list of the fields that are allowed there is the fix.
    ({"dedup": {"near": {"zzz": 1}}}, "spec.dedup.near.zzz",
     "remove it or fix its spelling; the fields here are enabled, threshold, numPerm, "
     "shingleSize."),
])
def test_unknown_field_suggests_name(spec, field, hint):
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "x"},
                "spec": {"sources": [{"name": "a", "format": "text", "path": "x"}], **spec}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "corpus.yaml")
    assert raised.value.field == field
    assert raised.value.detail.endswith(hint)


@pytest.mark.parametrize(("spec", "field"), [
    ({"dedup": {"near": {"threshold": float("inf")}}}, "spec.dedup.near.threshold"),
    ({"split": {"validationFraction": float("nan")}}, "spec.split.validationFraction"),
])
def test_non_finite_number_rejected(spec, field):
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "x"},
                "spec": {"sources": [{"name": "a", "format": "text", "path": "x"}], **spec}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "corpus.yaml")
    assert raised.value.field == field
    assert "write a finite number" in raised.value.detail


def test_duplicate_source_names_rejected():
    document = {"apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "x"},
                "spec": {"sources": [{"name": "a", "format": "text", "path": "x"},
                                     {"name": "a", "format": "text", "path": "y"}]}}
    with pytest.raises(InvalidResourceError) as raised:
        loader.parse_resource(document, "corpus.yaml")
    assert raised.value.field == "spec.sources"
    assert raised.value.detail == ("source names ['a'] are used more than once; give each "
                                   "source its own name.")


def test_dash_reads_standard_input(monkeypatch):
    """`-f -` reads resources from standard input, as `kubectl apply -f -` does."""
    monkeypatch.setattr("sys.stdin", io.StringIO(CORPUS + "---\n" + TOKENIZER))
    resources = loader.load_paths([Path("-")])
    assert [resource.kind for resource in resources] == ["Corpus", "Tokenizer"]
    assert resources[0].label == "Corpus/default/pubmed (in standard input)"


def test_pipe_path_is_read(tmp_path):
    """A path that exists but is not a regular file, such as a shell's <(...), is read."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=pipe.write_text, args=(CORPUS,))
    writer.start()
    resources = loader.load_paths([pipe])
    writer.join()
    assert [resource.kind for resource in resources] == ["Corpus"]


def test_joined_files_suggest_separator(tmp_path):
    """Two resources joined without `---` repeat the top-level keys; the fix is a separator."""
    joined = write(tmp_path, CORPUS + TOKENIZER)
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([joined])
    assert "duplicate key 'apiVersion'" in str(raised.value)
    assert "put a line with only --- before it" in str(raised.value)


def test_double_quoted_regex_escape_explained(tmp_path):
    """In double quotes, `\\.` is no YAML escape, and `\\b` is a backspace: both get the fix."""
    unknown = write(tmp_path, TOKENIZER + '  protectedPatterns:\n  - {name: icd, regex: "E11\\.9"}\n')
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([unknown])
    assert "unknown escape character" in str(raised.value)
    assert "write regular expressions in single quotes" in str(raised.value)

    backspace = write(tmp_path, TOKENIZER + '  protectedPatterns:\n  - {name: icd, regex: "\\bE11"}\n',
                      "backspace.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([backspace])
    assert "spec.protectedPatterns[0].regex" in str(raised.value)
    assert "control character U+0008" in str(raised.value)
    assert "write the pattern in single quotes" in str(raised.value)


def test_kubectl_list_is_unpacked(tmp_path):
    """`kubectl get corp,tok -o yaml` writes a v1 List; its Lathe items are loaded."""
    items = [yaml.safe_load(CORPUS), yaml.safe_load(TOKENIZER)]
    path = write(tmp_path, yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    resources = loader.load_paths([path])
    assert [resource.key for resource in resources] == ["Corpus/default/pubmed",
                                                        "Tokenizer/default/tok"]


def test_document_without_api_version_skipped(tmp_path, caplog):
    """A patch file without apiVersion, such as Argo CD's argocd-cm patch, is skipped."""
    write(tmp_path, "data:\n  key: value\n", "patch.yaml")
    write(tmp_path, CORPUS, "corpus.yaml")
    with caplog.at_level("WARNING", logger="lathe.loader"):
        resources = loader.load_paths([tmp_path])
    assert [resource.kind for resource in resources] == ["Corpus"]
    assert "it has no apiVersion, so it is not a Lathe resource" in caplog.text


def test_lathe_kind_without_api_version_rejected(tmp_path):
    path = write(tmp_path, CORPUS.replace("apiVersion: lathe.dev/v1alpha1\n", ""))
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([path])
    assert raised.value.field == "apiVersion"


def test_misspelled_kind_reference_and_file_suggested(tmp_path, data_dir):
    """A misspelled kind, reference name or data file name gets the close match."""
    kind = write(tmp_path, CORPUS.replace("kind: Corpus", "kind: Corpse"), "kind.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        loader.load_paths([kind])
    assert "did you mean 'Corpus'?" in str(raised.value)

    references = tmp_path / "references"
    references.mkdir()
    write(references, CORPUS, "corpus.yaml")
    write(references, TOKENIZER.replace("{name: pubmed}", "{name: pubmd}"), "tokenizer.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        order(loader.load_paths([references]))
    assert "fix the name (did you mean 'pubmed'?)" in str(raised.value)

    misspelled = write(tmp_path, CORPUS.replace("NCBItrainset_corpus", "NCBItrainset_corpu"),
                       "file.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        LocalRunner(tmp_path / "workspace", data_dir).check(loader.load_paths([misspelled]))
    assert ("did you mean 'pubmed/ncbi-disease/corpus/NCBItrainset_corpus.txt'?"
            in str(raised.value))

    # A shortened name: difflib alone ranks CDR_TestSet above CDR_DevelopmentSet for it.
    shortened = write(tmp_path, CORPUS.replace("ncbi-disease/corpus/NCBItrainset_corpus.txt",
                                               "bc5cdr/CDR_DevSet.PubTator.txt"), "short.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        LocalRunner(tmp_path / "workspace", data_dir).check(loader.load_paths([shortened]))
    assert ("did you mean 'pubmed/bc5cdr/CDR_DevelopmentSet.PubTator.txt'?"
            in str(raised.value)), str(raised.value)


@pytest.mark.parametrize(("requested", "suggested"), [
    ("date.txt", "data.txt"),  # under half of dataset_v2_large.txt: not a shortened form
    ("R", None),
    ("READM", "README"),
])
def test_file_suggestion_needs_half_the_name(tmp_path, requested, suggested):
    from lathe.preflight import _close_file

    for name in ("data.txt", "dataset_v2_large.txt", "README"):
        (tmp_path / name).touch()
    expected = f" (did you mean 'x/{suggested}'?)" if suggested else ""
    assert _close_file(f"x/{requested}", tmp_path / requested) == expected


FINETUNE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples/pubmed/04-finetune.yaml"


def finetune_with_rate(written: str) -> str:
    text = FINETUNE_EXAMPLE.read_text()
    assert "learningRate: 0.002" in text
    return text.replace("learningRate: 0.002", f"learningRate: {written}")


@pytest.mark.parametrize(("written", "expected"), [
    ("3e-3", 3e-3), ("1E-4", 1e-4), ("2.5e-4", 2.5e-4), ("+1e2", 100.0), (".5e1", 5.0),
])
def test_exponent_without_dot_is_number(tmp_path, written, expected):
    """YAML 1.1 reads 3e-3 as a string; Kubernetes reads it as a number, and so does lathe."""
    (resource,) = loader.load_paths([write(tmp_path, finetune_with_rate(written))])
    assert resource.spec.training.learning_rate == expected


def test_quoted_exponent_stays_string(tmp_path):
    with pytest.raises(InvalidResourceError, match="remove the quotes"):
        loader.load_paths([write(tmp_path, finetune_with_rate("'3e-3'"))])
