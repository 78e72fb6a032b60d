"""`lathe run` with `spec.storage.uri`: every artifact on a real S3 store (SeaweedFS), one in a
file:// folder of its own, and Triton serving the model repository the export wrote to S3."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from lathe_trainer.stage import MANIFEST
from lathe_trainer.training import storage

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pubmed"
RUN_TIMEOUT_SECONDS = 900
SAMPLE = "Mutations in BRCA1 cause hereditary breast cancer."

# Sizes that make each stage a few seconds: this suite checks where artifacts go, and the
# pipeline suite checks what the stages learn.
SMALL = {
    # Two workers exchange their results through the S3 output.
    "Corpus": {"sources": slice(0, 1), "shards": 1, "workers": 2},
    "Tokenizer": {"vocabSize": 2000},
    "PretrainJob": {"training": {"maxSteps": 6, "warmupSteps": 2, "checkpointInterval": 3,
                                 "evalInterval": 3},
                    "evalSequences": 16},
    "FineTune": {"training": {"maxSteps": 4, "warmupSteps": 1, "checkpointInterval": 2,
                              "evalInterval": 1000},
                 "compareFromScratch": False, "maxTrainSentences": 64, "maxEvalSentences": 32},
}


def _shrink(document: dict) -> None:
    for key, value in SMALL.get(document["kind"], {}).items():
        spec = document["spec"]
        if isinstance(value, slice):
            spec[key] = spec[key][value]
        elif isinstance(value, dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value


def lathe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lathe.cli", *args], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_SECONDS)  # fmt: skip


def summary_line(stdout: str, kind: str) -> str:
    """Return the summary line `KIND NAME: ... artifact ...` that `lathe run` prints for a
    stage after its progress lines."""
    for line in stdout.splitlines():
        words = line.split()
        if (len(words) > 1 and words[0] == kind and words[1].endswith(":")
                and " artifact " in line):
            return line
    return ""


def read_manifest(uri: str) -> dict:
    filesystem, base = storage.resolve(uri)
    return json.loads(filesystem.cat_file(f"{base}/{MANIFEST}"))


@pytest.fixture(scope="module")
def stored_run(s3_store, tmp_path_factory, data_dir):
    """Run the small example twice with its outputs on S3, the Tokenizer's in a file:// folder."""
    root = tmp_path_factory.mktemp("run-storage")
    bucket = f"s3://lathe/run-{uuid.uuid4().hex}"
    outputs = {}
    folder = root / "examples"
    folder.mkdir()
    for path in sorted(EXAMPLES.glob("*.yaml")):
        documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
        for document in documents:
            _shrink(document)
            kind = document["kind"]
            uri = (f"file://{root / 'tokenizer-output'}" if kind == "Tokenizer"
                   else f"{bucket}/{kind.lower()}")  # fmt: skip
            document["spec"]["storage"] = {"uri": uri}
            outputs[kind] = uri
        (folder / path.name).write_text(yaml.safe_dump_all(documents))
    workspace = root / "workspace"
    arguments = ["run", "-f", str(folder), "--workspace", str(workspace),
                 "--data-dir", str(data_dir), "--sample", SAMPLE]  # fmt: skip
    first = lathe(*arguments)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    second = lathe(*arguments)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return outputs, workspace, first, second


def test_artifacts_written_to_storage_uri(stored_run):
    outputs, workspace, _, _ = stored_run
    for kind, uri in outputs.items():
        manifest = read_manifest(uri)
        status = json.loads(next(workspace.glob(f"*/{kind.lower()}/*/status.json")).read_text())
        assert status["artifact"] == {"uri": uri, "digest": manifest["digest"]}, kind
        # Nothing was written to the workspace's default output folder instead.
        assert not list(workspace.glob(f"*/{kind.lower()}/*/output")), kind


def test_corpus_workers_leave_no_parts(stored_run):
    outputs, _, _, _ = stored_run
    filesystem, base = storage.resolve(outputs["Corpus"])
    # NB: objects, not the prefix: SeaweedFS keeps listing an emptied prefix for a while.
    assert filesystem.find(f"{base}/parts") == []
    assert read_manifest(outputs["Corpus"])["metrics"]["documentsOut"] > 0


def test_downstream_inputs_read_from_storage(stored_run):
    outputs, _, _, _ = stored_run
    assert read_manifest(outputs["Tokenizer"])["inputs"]["corpus"]["uri"] == outputs["Corpus"]
    pretrain_inputs = read_manifest(outputs["PretrainJob"])["inputs"]
    assert pretrain_inputs["tokenizer"]["uri"] == outputs["Tokenizer"]
    finetune_inputs = read_manifest(outputs["FineTune"])["inputs"]
    assert finetune_inputs["baseModel"]["uri"] == outputs["PretrainJob"]
    export_inputs = read_manifest(outputs["ModelDeployment"])["inputs"]
    assert export_inputs["model"]["uri"] == outputs["FineTune"]
    filesystem, base = storage.resolve(outputs["ModelDeployment"])
    assert filesystem.find(f"{base}/model_repository"), "the export wrote no model repository"


def test_triton_serves_repository_from_s3(stored_run):
    _, _, first, _ = stored_run
    assert "Triton is serving model" in first.stdout, first.stdout[-4000:]
    assert f"Sample: {SAMPLE}" in first.stdout


def test_second_run_reuses_stored_artifacts(stored_run):
    outputs, _, _, second = stored_run
    for kind in outputs:
        assert ": reused," in summary_line(second.stdout, kind), (kind, second.stdout[-4000:])


def test_run_rejects_pvc_storage(tmp_path):
    resource = tmp_path / "corpus.yaml"
    document = next(doc for doc in yaml.safe_load_all((EXAMPLES / "01-corpus.yaml").read_text())
                    if doc)  # fmt: skip
    document["spec"]["storage"] = {"uri": "pvc://artifacts/corpus"}
    resource.write_text(yaml.safe_dump(document))
    completed = lathe("validate", "-f", str(resource))
    assert completed.returncode == 1
    output = " ".join(completed.stderr.split())
    assert "Corpus/default/pubmed" in output, output
    assert "spec.storage.uri" in output
    assert "pvc://artifacts/corpus" in output
    assert "file:///path, s3://bucket/prefix" in output


def test_run_keeps_foreign_folder(tmp_path, data_dir):
    """A `spec.storage.uri` that names a folder with files no stage wrote is rejected, and the
    files stay."""
    folder = tmp_path / "my-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    document = next(doc for doc in yaml.safe_load_all((EXAMPLES / "01-corpus.yaml").read_text())
                    if doc)  # fmt: skip
    document["spec"]["storage"] = {"uri": f"file://{folder}"}
    resource = tmp_path / "corpus.yaml"
    resource.write_text(yaml.safe_dump(document))
    completed = lathe("run", "-f", str(resource), "--workspace", str(tmp_path / "workspace"),
                      "--data-dir", str(data_dir))  # fmt: skip
    assert completed.returncode == 1
    output = " ".join(completed.stderr.split())
    assert "spec.storage.uri" in output, output
    assert "notes.txt" in output, output
    assert "point it to a new or empty location" in output
    assert (folder / "notes.txt").read_text() == "keep me"


def test_rerun_keeps_storage_folder(tmp_path, data_dir):
    """A changed spec empties its `spec.storage.uri` folder instead of deleting it, so a
    folder that the user may write in, inside one they may not, still works for the rerun."""
    folder = tmp_path / "corpus-out"
    document = next(doc for doc in yaml.safe_load_all((EXAMPLES / "01-corpus.yaml").read_text())
                    if doc)  # fmt: skip
    document["spec"]["storage"] = {"uri": f"file://{folder}"}
    resource = tmp_path / "corpus.yaml"
    arguments = ("run", "-f", str(resource), "--workspace", str(tmp_path / "workspace"),
                 "--data-dir", str(data_dir))
    resource.write_text(yaml.safe_dump(document))
    first = lathe(*arguments)
    assert first.returncode == 0, first.stderr
    inode = folder.stat().st_ino
    first_key = json.loads((folder / "manifest.json").read_text())["stageKey"]

    document["spec"]["split"] = {**document["spec"].get("split", {}), "seed": 7}
    resource.write_text(yaml.safe_dump(document))
    second = lathe(*arguments)
    assert second.returncode == 0, second.stderr
    assert folder.stat().st_ino == inode
    assert json.loads((folder / "manifest.json").read_text())["stageKey"] != first_key
