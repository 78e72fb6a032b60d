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


RECORD = {
    "time": 1_700_000_000.0, "completed": 120, "total": 200, "unit": "steps",
    "message": "Non-finite step 120 (skip): loss is nan.", "loss": 2.5,
    "tokensPerSecond": 5000.0, "etaSeconds": 16.0, "tokensSeen": 61440, "epoch": 0,
    "nonFiniteSteps": 3, "curriculumStage": 1, "mfu": 0.41,
}


def test_status_keeps_trainer_fields():
    """A skip, rollback or curriculum stage change shows in status while the job runs."""
    status = progress.to_status(RECORD)
    assert status["step"] == 120
    assert status["totalSteps"] == 200
    assert status["nonFiniteSteps"] == 3
    assert status["curriculumStage"] == 1
    assert status["mfu"] == 0.41
    assert status["message"] == "Non-finite step 120 (skip): loss is nan."
    assert status["updatedAt"] == "2023-11-14T22:13:20Z"


def test_status_omits_empty_message():
    """Under a merge patch, an omitted message keeps the previous one in status."""
    status = progress.to_status({**RECORD, "message": "", "mfu": None})
    assert "message" not in status
    assert "mfu" not in status
    assert status["nonFiniteSteps"] == 3


def test_status_fits_progress_model():
    from lathe.api.common import Progress

    status = progress.to_status(RECORD)
    model = Progress.model_validate(status)
    assert model.model_dump(by_alias=True, exclude_none=True) == status


def test_progress_fields_in_crd():
    from lathe import crdgen
    from lathe.api import KINDS

    for kind in ("PretrainJob", "FineTune"):
        schema = crdgen.crd(KINDS[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        fields = schema["properties"]["status"]["properties"]["progress"]["properties"]
        for name in ("nonFiniteSteps", "curriculumStage", "mfu", "message"):
            assert fields[name]["description"], (kind, name)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_reads_progress_from_trainer_port():
    """The operator reads what rank 0's exporter serves, as for a claim it does not mount."""
    from lathe_trainer.training.metrics import PrometheusExporter

    port = _free_port()
    exporter = PrometheusExporter(port, {"namespace": "ns", "kind": "PretrainJob", "name": "lm"},
                                  address="127.0.0.1")
    try:
        assert progress.read_pod_metrics("127.0.0.1", port) is None  # no step finished yet
        exporter.update(step=7, total_steps=100, loss=float("nan"), tokens_per_second=1234.0,
                        eta_seconds=93.0, tokens_seen=7168, mfu=None)
        record = progress.read_pod_metrics("127.0.0.1", port)
    finally:
        exporter.close()
    values = progress.to_status(record)
    assert values["step"] == 7
    assert values["totalSteps"] == 100
    assert values["tokensPerSecond"] == 1234.0
    assert values["etaSeconds"] == 93.0
    assert values["tokensSeen"] == 7168
    assert "loss" not in values  # NaN has no JSON form
    assert "mfu" not in values  # 0 on a CPU
    assert values["nonFiniteSteps"] == 0
    assert values.get("curriculumStage") is None  # no curriculum, so no stage


def test_trainer_port_reports_skips_and_curriculum_stage():
    """A skipped step and the curriculum stage reach status from rank 0's port too, not only
    from the progress file."""
    from lathe_trainer.training.metrics import PrometheusExporter

    port = _free_port()
    exporter = PrometheusExporter(port, {"namespace": "ns", "kind": "PretrainJob", "name": "lm"},
                                  address="127.0.0.1")
    try:
        exporter.update(step=12, total_steps=100, non_finite_steps=2, curriculum_stage=1)
        record = progress.read_pod_metrics("127.0.0.1", port)
    finally:
        exporter.close()
    values = progress.to_status(record)
    assert (values["nonFiniteSteps"], values["curriculumStage"]) == (2, 1)


def test_unanswered_trainer_port_raises():
    import pytest

    with pytest.raises(OSError):
        progress.read_pod_metrics("127.0.0.1", _free_port(), timeout=1.0)


def _serve_once(reply: bytes) -> int:
    """Start a loopback server that sends `reply` to one request and closes; return its port."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(reply)
        server.close()

    threading.Thread(target=answer, daemon=True).start()
    return server.getsockname()[1]


def test_invalid_trainer_reply_raises_oserror():
    """A reply that is not HTTP, or one cut short, raises OSError like a closed port."""
    import pytest

    cut_short = b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\nlathe_training_step 3\n"
    for reply in (b"not http\r\n\r\n", cut_short):
        with pytest.raises(OSError, match="invalid HTTP reply"):
            progress.read_pod_metrics("127.0.0.1", _serve_once(reply), timeout=5.0)


def test_unmounted_claim_not_readable(tmp_path):
    (tmp_path / "lathe" / "pretrainjob" / "lm").mkdir(parents=True)
    assert not progress.readable("pvc://team-data/lathe/pretrainjob/lm", {})
    assert progress.readable("pvc://team-data/lathe/pretrainjob/lm", {"team-data": str(tmp_path)})
    assert progress.readable("s3://bucket/lathe/pretrainjob/lm")


def test_trainer_port_read_ignores_proxy(monkeypatch):
    """A pod IP is read directly, even where http_proxy is set for the artifact store."""
    import urllib.request

    from lathe_trainer.training.metrics import PrometheusExporter

    port = _free_port()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen keeps the opener of its first call, which may predate the variable.
    monkeypatch.setattr(urllib.request, "_opener", None)
    exporter = PrometheusExporter(port, {"namespace": "ns", "kind": "PretrainJob", "name": "lm"},
                                  address="127.0.0.1")
    try:
        exporter.update(step=3, total_steps=10)
        record = progress.read_pod_metrics("127.0.0.1", port)
    finally:
        exporter.close()
    assert record["completed"] == 3


def test_file_root_readable_only_where_present(tmp_path):
    """A file:// root that only the training pods have sends the operator to rank 0's port."""
    assert progress.readable(f"file://{tmp_path}")
    assert not progress.readable(f"file://{tmp_path}/only-in-the-pods")
