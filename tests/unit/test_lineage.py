"""`lathe lineage` on manifests written as the stages write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lathe import cli
from lathe.lineage import LineageError, find_output, lineage_lines


def write_manifest(directory: Path, kind: str, name: str, digest: str, inputs: dict | None = None,
                   metrics: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": kind, "name": name, "digest": digest, "inputs": inputs or {},
                "metrics": metrics or {}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def reference(kind: str, name: str, directory: Path, digest: str) -> dict:
    return {"kind": kind, "name": name, "uri": f"file://{directory}", "digest": digest}


@pytest.fixture
def chain(tmp_path):
    """A Corpus, a Tokenizer that read it, and a PretrainJob that read both."""
    corpus = write_manifest(tmp_path / "corpus" / "c" / "output", "Corpus", "c", "sha256:c1",
                            metrics={"sourceDigests": {"ncbi": "sha256:s1"}})
    tokenizer = write_manifest(tmp_path / "tokenizer" / "t" / "output", "Tokenizer", "t",
                               "sha256:t1", {"corpus": reference("Corpus", "c", corpus, "sha256:c1")})
    model = write_manifest(
        tmp_path / "pretrainjob" / "m" / "output", "PretrainJob", "m", "sha256:m1",
        {"corpus": reference("Corpus", "c", corpus, "sha256:c1"),
         "tokenizer": reference("Tokenizer", "t", tokenizer, "sha256:t1")},
    )
    return {"corpus": corpus, "tokenizer": tokenizer, "model": model}


def test_lineage_reaches_sources(chain):
    assert list(lineage_lines(chain["model"])) == [
        "PretrainJob m  sha256:m1",
        "  Corpus c  sha256:c1",
        "    source ncbi  sha256:s1",
        "  Tokenizer t  sha256:t1",
        # The Corpus was listed with its inputs already.
        "    Corpus c  sha256:c1  (its inputs are listed above)",
    ]


def test_data_files_listed_per_stage(tmp_path):
    corpus = write_manifest(tmp_path / "corpus", "Corpus", "c", "sha256:c1")
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["data"] = {"pubmed/a.txt": "sha256:a1", "pubmed/eval.txt": "sha256:e1"}
    manifest["metrics"] = {"sourceDigests": {"a": "sha256:a1"}}
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    assert list(lineage_lines(corpus)) == [
        "Corpus c  sha256:c1",
        "  data pubmed/a.txt  sha256:a1",
        "  data pubmed/eval.txt  sha256:e1",
    ]


def test_rewritten_input_shows_recorded_digest(chain):
    """A Corpus that ran again on its own has another digest now. The PretrainJob was built
    from the recorded one, so the lineage shows that one and marks the change."""
    write_manifest(chain["corpus"], "Corpus", "c", "sha256:c2",
                   metrics={"sourceDigests": {"ncbi": "sha256:s2"}})
    lines = list(lineage_lines(chain["model"]))
    assert lines[1].startswith("  Corpus c  sha256:c1  (rewritten since: ")
    assert "now contains sha256:c2" in lines[1]
    assert not any("sha256:s2" in line for line in lines)
    assert not any(line.strip().startswith("Corpus c  sha256:c2") for line in lines)


def test_missing_input_reported_inline(chain, tmp_path):
    (chain["tokenizer"] / "manifest.json").unlink()
    lines = list(lineage_lines(chain["model"]))
    assert lines[-1].startswith("  Tokenizer t  sha256:t1  (not readable: ")
    assert "contains no manifest.json" in lines[-1]


def test_stage_directory_and_uri_accepted(chain):
    stage_directory = chain["model"].parent
    assert find_output(str(stage_directory)) == chain["model"]
    assert find_output(f"file://{chain['model']}") == chain["model"]


MINIMAL = '"kind": "Corpus", "name": "c", "digest": "sha256:c1"'


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "is not a Lathe manifest"),
    ('{"kind": "Corpus"}', "is not a Lathe manifest"),
    ("{" + MINIMAL + ', "inputs": [1]}', "inputs is not an object"),
    ("{" + MINIMAL + ', "data": ["a"]}', "data is not an object"),
    ("{" + MINIMAL + ', "metrics": []}', "metrics is not an object"),
    ("{" + MINIMAL + ', "inputs": {"corpus": "s"}}', "input 'corpus' has no uri"),
    ("{" + MINIMAL + ', "inputs": {"corpus": {"uri": 5}}}', "input 'corpus' has no uri"),
])
def test_broken_manifest_rejected(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(LineageError, match=message):
        list(lineage_lines(tmp_path))


@pytest.mark.parametrize("name, message", [
    ("absent", "does not exist"),
    ("empty", "contains no manifest.json"),
])
def test_cli_reports_missing_output(tmp_path, capsys, name, message):
    (tmp_path / "empty").mkdir()
    assert cli.main(["lineage", str(tmp_path / name)]) == 1
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


@pytest.mark.parametrize("phase, conditions, expected", [
    ("Failed", [{"type": "Failed", "status": "True", "reason": "JobFailed",
                 "message": "Exit code 42: spec.sources: no documents remain\nmore"}],
     "the stage failed (JobFailed: Exit code 42: spec.sources: no documents remain), so it has "
     "no lineage yet. Its log is {stage}/stage.log."),
    ("Suspended", [], "the stage has not finished (phase Suspended)"),
])
@pytest.mark.parametrize("given", ["stage", "output"])
def test_unfinished_stage_explained(tmp_path, capsys, phase, conditions, expected, given):
    """Lineage of a stage that failed or has not finished says so, from its status.json."""
    stage = tmp_path / "default" / "corpus" / "pubmed"
    (stage / "output").mkdir(parents=True)
    (stage / "stage.log").write_text("error: ...\n")
    (stage / "status.json").write_text(json.dumps({"phase": phase, "conditions": conditions}))
    path = stage if given == "stage" else stage / "output"
    assert cli.main(["lineage", str(path)]) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert expected.format(stage=stage) in error
    assert "pass the output directory of a finished stage" not in error


def test_inputs_on_s3_followed(s3_store, tmp_path, monkeypatch):
    """An input whose output lives on an object store is read there."""
    import uuid

    from lathe_trainer.training import storage

    for key, value in s3_store.env.items():
        monkeypatch.setenv(key, value)
    corpus_uri = f"s3://lathe/lineage-{uuid.uuid4().hex}/corpus"
    filesystem, base = storage.resolve(corpus_uri)
    filesystem.pipe_file(f"{base}/manifest.json", json.dumps(
        {"kind": "Corpus", "name": "c", "digest": "sha256:c1", "data": {"a.txt": "sha256:a1"}}
    ).encode())
    model = write_manifest(tmp_path / "model", "PretrainJob", "m", "sha256:m1", {
        "corpus": {"kind": "Corpus", "name": "c", "uri": corpus_uri, "digest": "sha256:c1"},
        "tokenizer": {"kind": "Tokenizer", "name": "t", "uri": "pvc://claim/t",
                      "digest": "sha256:t1"},
    })
    lines = list(lineage_lines(model))
    assert lines[:3] == ["PretrainJob m  sha256:m1", "  Corpus c  sha256:c1",
                         "    data a.txt  sha256:a1"]
    assert lines[3].startswith("  Tokenizer t  sha256:t1  (not readable: pvc://claim/t is on a "
                               "PersistentVolumeClaim")
