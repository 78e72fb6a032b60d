"""`lathe run` against object stores that fail or hold no output yet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import yaml

CORPUS = {
    "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "notes"},
    "spec": {"sources": [{"name": "notes", "format": "jsonl", "path": "notes.jsonl"}],
             "storage": {"uri": "s3://lathe/notes"}},
}


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_against_closed_port(tmp_path, corpus: dict) -> subprocess.CompletedProcess:
    """Run `corpus` with lathe run, its S3 client pointed at a loopback port that nothing
    listens on, with placeholder credentials."""
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": "one two three four five"}))
    (tmp_path / "corpus.yaml").write_text(yaml.safe_dump(corpus))
    env = {
        **os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "lathe.cli", "run", "-f", str(tmp_path / "corpus.yaml"),
         "--data-dir", str(tmp_path), "--workspace", str(tmp_path / "workspace")],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_unreachable_store_names_field(tmp_path):
    """A storage.uri on a store that cannot be reached fails with one error line that names the
    resource, the field and the variables to check, not obstore's traceback."""
    completed = run_against_closed_port(tmp_path, CORPUS)
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "Exception ignored" not in completed.stderr
    assert completed.stderr.startswith("error: Corpus/default/notes (in "), completed.stderr
    assert "spec.storage.uri: the object store request failed: " in completed.stderr
    assert "error sending request" in completed.stderr
    assert "AWS_ENDPOINT_URL" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr


def test_unreachable_data_path_quoted(tmp_path):
    """A stage that cannot fetch an s3:// data path ends its log, which lathe run quotes, with
    the first line of obstore's message instead of its Rust debug output."""
    corpus = {**CORPUS, "spec": {"sources": [
        {"name": "notes", "format": "jsonl", "path": "s3://lathe/notes.jsonl"}]}}
    completed = run_against_closed_port(tmp_path, corpus)
    quoted = completed.stderr.split("(the whole log:")[0].strip().splitlines()

    assert completed.returncode == 1, completed.stderr
    assert "the stage failed with exit code 1" in completed.stderr
    assert quoted[-1].startswith("GenericError: Generic S3 error: "), completed.stderr
    assert "/lathe/notes.jsonl " in quoted[-1], quoted[-1]


def test_manifest_read_on_store(s3_store):
    """A stage output on S3 without manifest.json has none yet; one with it returns it."""
    from lathe.local.runner import _read_manifest
    from lathe_trainer.training import storage

    uri = f"s3://lathe/manifest-{uuid.uuid4().hex}"
    missing = _read_manifest(uri)
    filesystem, base = storage.resolve(uri)
    filesystem.pipe_file(f"{base}/manifest.json", b'{"stageKey": "sha256:1"}')

    assert missing is None
    assert _read_manifest(uri) == {"stageKey": "sha256:1"}


def test_store_error_outside_stage_is_one_line(monkeypatch, capsys):
    """An object store error outside a stage, such as while reading the workspace's records,
    ends the command with exit code 1 and the first line of obstore's message."""
    import obstore.exceptions

    from lathe import cli

    def fail(_args, _console):
        raise obstore.exceptions.GenericError("Generic S3 error: access denied\n\nDebug source:")

    monkeypatch.setattr(cli, "_validate", fail)
    code = cli.main(["validate", "-f", "unused.yaml"])
    error = capsys.readouterr().err

    assert code == 1
    assert error.startswith("error: the object store request failed: Generic S3 error: access "
                            "denied; check the store's address (AWS_ENDPOINT_URL)"), error
    assert "Debug source" not in error
