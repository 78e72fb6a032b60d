"""Stage inputs and outputs on s3://, staged through local directories, on a real S3 store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from lathe_trainer import remote, stage
from lathe_trainer.stage import ResolvedInput, StageConfig
from lathe_trainer.training import storage


def config_for(upstream: str, output: str) -> StageConfig:
    return StageConfig(
        kind="ModelDeployment", name="ner", namespace="ml", stage_key="sha256:" + "ab" * 32,
        spec={}, output_uri=output, data_dir="/data",
        inputs={"model": ResolvedInput(kind="FineTune", name="ner", uri=upstream,
                                       digest="sha256:0")},  # fmt: skip
    )


def test_staged_copies_inputs_and_mirrors_output(s3_store, tmp_path, monkeypatch):
    monkeypatch.setenv("LATHE_SCRATCH_DIR", str(tmp_path / "scratch"))
    root = f"s3://lathe/remote-{uuid.uuid4().hex}"
    filesystem, base = storage.resolve(root)
    filesystem.pipe_file(f"{base}/finetune/model/config.json", b"{}")
    filesystem.pipe_file(f"{base}/finetune/checkpoints/lora/step-00000001/state.pt", b"x")
    filesystem.pipe_file(f"{base}/export/stale.txt", b"from an earlier attempt")
    config = config_for(f"{root}/finetune", f"{root}/export")

    with remote.staged(config) as local:
        model_input = storage.resolve(local.inputs["model"].uri)[1]
        output = storage.resolve(local.output_uri)[1]
        assert local.output_uri.startswith("file://")
        assert local.staged_from == {local.inputs["model"].uri: f"{root}/finetune",
                                     local.output_uri: f"{root}/export"}  # fmt: skip
        # The upstream's checkpoints are not part of the input.
        assert sorted(p.relative_to(model_input).as_posix()
                      for p in Path(model_input).rglob("*") if p.is_file()) == [
            "model/config.json"]  # fmt: skip
        # The output of the attempt before is there to resume from.
        assert (Path(output) / "stale.txt").read_text() == "from an earlier attempt"
        (Path(output) / "stale.txt").unlink()
        (Path(output) / "model_repository").mkdir()
        (Path(output) / "model_repository" / "config.pbtxt").write_text("name: \"ner\"")
        (Path(output) / "manifest.json").write_text("{}")

    files = sorted(path[len(f"{base}/export"):].lstrip("/")
                   for path in filesystem.find(f"{base}/export"))  # fmt: skip
    assert files == ["manifest.json", "model_repository/config.pbtxt"]


def test_local_uris_pass_through(tmp_path):
    config = config_for(f"file://{tmp_path}/up", f"file://{tmp_path}/out")
    with remote.staged(config) as local:
        assert local is config


def test_data_paths_fetched_from_s3(s3_store, tmp_path, monkeypatch):
    """Relative data paths under an s3:// data directory, files and directories, are
    downloaded once; a missing one resolves to a path that does not exist."""
    monkeypatch.setenv("LATHE_SCRATCH_DIR", str(tmp_path / "scratch"))
    root = f"s3://lathe/data-{uuid.uuid4().hex}"
    filesystem, base = storage.resolve(root)
    filesystem.pipe_file(f"{base}/pubmed/train.tsv", b"Aspirin\tO\n")
    filesystem.pipe_file(f"{base}/models/base/config.json", b"{}")
    config = config_for(f"file://{tmp_path}/up", f"file://{tmp_path}/out").model_copy(
        update={"data_dir": root})
    train = stage.resolve_data_path(config, "pubmed/train.tsv")
    assert train.read_text() == "Aspirin\tO\n"
    base_model = stage.resolve_data_path(config, f"{root}/models/base")
    assert (base_model / "config.json").read_text() == "{}"
    assert not stage.resolve_data_path(config, "pubmed/missing.tsv").exists()
    # The second read uses the copy on the node.
    filesystem.rm_file(f"{base}/pubmed/train.tsv")
    assert stage.resolve_data_path(config, "pubmed/train.tsv").read_text() == "Aspirin\tO\n"


STAGE_THEN_WAIT = """
import sys, time
from pathlib import Path
from lathe_trainer import remote
from lathe_trainer.stage import StageConfig
config = StageConfig(kind="Corpus", name="c", namespace="ml", stage_key="sha256:" + "cd" * 32,
                     spec={}, output_uri=sys.argv[1], data_dir="/data")
try:
    with remote.staged(config) as local:
        output = Path(local.output_uri[len("file://"):])
        (output / "shard.jsonl").write_text("written before SIGTERM")
        print("ready", flush=True)
        time.sleep(600)
except SystemExit as stop:
    # As python -m lathe_trainer ends a stage.
    remote.exit_process(stop.code)
"""


def test_sigterm_uploads_before_exit(s3_store, tmp_path):
    """A pod stopped with SIGTERM (suspend, preemption) still uploads what the stage wrote."""
    output = f"s3://lathe/sigterm-{uuid.uuid4().hex}"
    env = {**os.environ, **s3_store.env, "LATHE_SCRATCH_DIR": str(tmp_path),
           "LATHE_SYNC_SECONDS": "3600"}  # only the last upload can send the file
    process = subprocess.Popen([sys.executable, "-c", STAGE_THEN_WAIT, output], env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    filesystem, base = storage.resolve(output)
    assert filesystem.cat_file(f"{base}/shard.jsonl") == b"written before SIGTERM"
