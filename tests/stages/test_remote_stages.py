"""Stages with s3:// inputs and outputs on a real S3-compatible store (SeaweedFS).

Each stage runs as a pod runs it, `python -m lathe_trainer STAGE --config FILE` (under torchrun
for the PretrainJob), with its output on S3 and its inputs read from the upstream outputs on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from lathe.api import KINDS
from lathe.plans import stage_config
from lathe_trainer.stage import MANIFEST, PROGRESS, ResolvedInput
from lathe_trainer.training import checkpoint, storage

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pubmed"
RUN_TIMEOUT_SECONDS = 600


def example(kind: str) -> dict:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == kind:
                return document
    raise LookupError(kind)


def corpus_resource() -> dict:
    document = example("Corpus")
    document["spec"]["sources"] = document["spec"]["sources"][:1]  # BC5CDR training abstracts
    document["spec"]["shards"] = 1
    return document


def tokenizer_resource() -> dict:
    document = example("Tokenizer")
    document["spec"]["vocabSize"] = 2000
    return document


def pretrain_resource(max_steps: int) -> dict:
    return {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "lm"},
        "spec": {
            "corpusRef": {"name": "pubmed"}, "tokenizerRef": {"name": "pubmed"},
            "model": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                      "intermediateSize": 128, "maxPositionEmbeddings": 128},
            "sequenceLength": 64, "evalSequences": 32,
            "training": {"maxSteps": max_steps, "microBatchSize": 4, "learningRate": 3e-3,
                         "warmupSteps": 2, "checkpointInterval": 4, "evalInterval": 4,
                         "keepCheckpoints": 2},
            "distributed": {"nodes": 1, "procsPerNode": 2},
        },
    }


def run(tmp_path: Path, resource: dict, inputs: dict[str, ResolvedInput], output_uri: str,
        data_dir: Path, scratch: Path, resume: bool = False) -> subprocess.CompletedProcess:
    """Run the stage of `resource` in a subprocess with its output at `output_uri`."""
    resource["metadata"].setdefault("namespace", "test")
    model = KINDS[resource["kind"]].model_validate(resource)
    config = stage_config(model, inputs, output_uri, str(data_dir))
    path = tmp_path / f"{resource['kind'].lower()}-config.json"
    path.write_text(config.model_dump_json())
    stage = {"Corpus": "corpus", "Tokenizer": "tokenizer", "PretrainJob": "pretrain"}
    module = ["-m", "lathe_trainer", stage[resource["kind"]], "--config", str(path)]
    if resource["kind"] == "PretrainJob":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", *module]
    else:
        command = [sys.executable, *module]
    command += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LATHE_SCRATCH_DIR": str(scratch),
           "LATHE_SYNC_SECONDS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def finished(uri: str, kind: str, name: str) -> ResolvedInput:
    """The upstream as the operator passes it on: its URI and the digest of its manifest."""
    filesystem, base = storage.resolve(uri)
    manifest = json.loads(filesystem.cat_file(f"{base}/{MANIFEST}"))
    return ResolvedInput(kind=kind, name=name, uri=uri, digest=manifest["digest"])


@pytest.fixture(scope="module")
def upstream(s3_store, tmp_path_factory, data_dir) -> dict[str, ResolvedInput]:
    """A Corpus and a Tokenizer whose outputs are on S3, the Tokenizer reading the Corpus
    from there."""
    root = f"s3://lathe/stages-{uuid.uuid4().hex}"
    work = tmp_path_factory.mktemp("upstream")
    run(work, corpus_resource(), {}, f"{root}/corpus", data_dir, work / "scratch")
    corpus = finished(f"{root}/corpus", "Corpus", "pubmed")
    run(work, tokenizer_resource(), {"corpus": corpus}, f"{root}/tokenizer", data_dir,
        work / "scratch")
    return {"corpus": corpus, "tokenizer": finished(f"{root}/tokenizer", "Tokenizer", "pubmed")}


def remote_files(uri: str) -> set[str]:
    filesystem, base = storage.resolve(uri)
    return {path[len(base):].lstrip("/") for path in filesystem.find(base)}


def test_corpus_and_tokenizer_outputs_on_s3(upstream):
    corpus = remote_files(upstream["corpus"].uri)
    assert {MANIFEST, PROGRESS, "train/shard-00000.jsonl"} <= corpus, corpus
    tokenizer = remote_files(upstream["tokenizer"].uri)
    assert {MANIFEST, "tokenizer.json"} <= tokenizer, tokenizer
    filesystem, base = storage.resolve(upstream["tokenizer"].uri)
    manifest = json.loads(filesystem.cat_file(f"{base}/{MANIFEST}"))
    # The Tokenizer read its Corpus from S3, and its manifest records that input.
    assert manifest["inputs"]["corpus"]["uri"] == upstream["corpus"].uri
    assert manifest["outputs"]["tokenizer.json"].startswith("sha256:")


def test_pretrain_resumes_in_a_new_pod_from_s3(upstream, tmp_path, data_dir):
    """A retry on another node (a fresh scratch directory) continues from the checkpoint that
    the first attempt mirrored to S3."""
    output = f"s3://lathe/pretrain-{uuid.uuid4().hex}"
    run(tmp_path, pretrain_resource(max_steps=12), upstream, output, data_dir,
        tmp_path / "first-pod")
    files = remote_files(output)
    assert MANIFEST in files
    # keepCheckpoints 2 pruned step 4 on S3 when step 12 was saved.
    assert [step for step, _ in checkpoint.list_checkpoints(f"{output}/checkpoints")] == [8, 12]
    assert not any(path.startswith("checkpoints/step-00000004/") for path in files)
    # As if the first pod had stopped between the step-8 and step-12 checkpoints.
    filesystem, base = storage.resolve(output)
    storage.remove_tree(filesystem, f"{base}/checkpoints/step-00000012")
    run(tmp_path, pretrain_resource(max_steps=12), upstream, output, data_dir,
        tmp_path / "second-pod", resume=True)
    metrics = json.loads(filesystem.cat_file(f"{base}/metrics.json"))
    assert metrics["resumedFromStep"] == 8
    assert metrics["steps"] == 12
    assert [step for step, _ in checkpoint.list_checkpoints(f"{output}/checkpoints")] == [8, 12]
    records = [json.loads(line) for line in
               filesystem.cat_file(f"{base}/{PROGRESS}").decode().splitlines()]  # fmt: skip
    # The progress of both attempts is in the one file on S3.
    assert any(record["message"] == "Starting at step 8." for record in records)
    assert max(record["completed"] for record in records) == 12
