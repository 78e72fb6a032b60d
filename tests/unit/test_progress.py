"""The operator's read of live training progress from the artifact store."""

from __future__ import annotations

import json
import uuid

from lathe.k8s import progress
from lathe_trainer.training import storage


def records(count: int) -> bytes:
    lines = [json.dumps({"completed": step, "total": count, "loss": 1.0 / step})
             for step in range(1, count + 1)]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def test_reads_last_record_from_file(tmp_path):
    (tmp_path / "progress.jsonl").write_bytes(records(3) + b'{"completed": 4, "tot')
    assert progress.read_latest(f"file://{tmp_path}")["completed"] == 3


def test_missing_file_is_no_progress(tmp_path):
    assert progress.read_latest(f"file://{tmp_path}/nothing-yet") is None


def test_reads_last_record_from_s3(s3_store):
    """The operator reads a stage output on a real S3 store, as for an s3:// artifact root."""
    output = f"s3://lathe/progress-{uuid.uuid4().hex}"
    filesystem, base = storage.resolve(output)
    # More than the bytes read from the end, so the read starts mid-file.
    filesystem.pipe_file(f"{base}/progress.jsonl", records(500))
    assert progress.read_latest(output)["completed"] == 500
    assert progress.read_latest(f"{output}-missing") is None
