"""Two operator processes elect one leader through a Lease on the real API server.

Each operator runs as `kopf run` in its own process, as it does in a pod, with the settings the
Helm chart gives it and short election timings (lease 6 s, renew deadline 4 s, retry 1 s). Both
watch only the test's namespace. The session's own operator (conftest.py) may watch it too, so
which process reconciled is read from each process's own reconcile counter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lathe_objects import pretrain_job
from operator_runner import _free_port

REPO = Path(__file__).resolve().parents[2]
TIMINGS = {"LATHE_LEASE_DURATION": "6", "LATHE_RENEW_DEADLINE": "4", "LATHE_RETRY_PERIOD": "1"}


@dataclass
class OperatorProcess:
    identity: str
    process: subprocess.Popen
    log: Path
    liveness_url: str
    metrics_url: str

    def log_text(self) -> str:
        return self.log.read_text()

    def liveness(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.liveness_url, timeout=2) as response:
                return response.status, response.read().decode()
        except OSError as error:
            return 0, str(error)

    def metric(self, name: str, **labels: str) -> float | None:
        """Return the value of one series from this process's /metrics, or None if absent."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
        series = f"{name}{{{wanted}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return None

    def reconciles(self, kind: str) -> float:
        return sum(self.metric("lathe_reconciles_total", kind=kind, result=result) or 0.0
                   for result in ("success", "waiting", "error"))


@pytest.fixture
def start_operator(cluster, namespace, tmp_path) -> Iterator:
    lease = f"lathe-test-{uuid.uuid4().hex[:8]}"
    started: list[OperatorProcess] = []

    def start(identity: str) -> OperatorProcess:
        liveness = f"http://127.0.0.1:{_free_port()}/healthz"
        metrics_port = _free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "PYTHONPATH": os.pathsep.join(
                str(path) for path in (REPO / "operator", REPO / "trainer", Path(__file__).parent)
            ),
            "LATHE_ARTIFACT_ROOT": f"file://{tmp_path / 'artifacts'}",
            "LATHE_METRICS_PORT": str(metrics_port),
            "LATHE_METRICS_HOST": "127.0.0.1",
            "LATHE_LEADER_ELECTION": "true",
            "LATHE_LEADER_ELECTION_NAMESPACE": namespace,
            "LATHE_LEADER_ELECTION_ID": lease,
            "LATHE_POD_NAME": identity,
            "LATHE_LIVENESS_ENDPOINT": liveness,
            **TIMINGS,
        }
        log = tmp_path / f"{identity}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                # loopback_only keeps the operator off the kwok pods' addresses.
                [sys.executable, "-m", "kopf", "run", "--standalone", f"--namespace={namespace}",
                 "-m", "loopback_only", "-m", "lathe.k8s.handlers", f"--liveness={liveness}"],
                env=env, stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path,
            )
        running = OperatorProcess(identity, process, log, liveness,
                                  f"http://127.0.0.1:{metrics_port}/metrics")
        started.append(running)
        return running

    start.lease = lease
    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=30)


def holder(cluster, namespace: str, lease: str) -> str | None:
    result = cluster.kubectl("get", "lease", lease, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)["spec"].get("holderIdentity")


def wait_for_log(cluster, operator: OperatorProcess, text: str, timeout: float = 60.0) -> None:
    cluster.wait_for(lambda: text in operator.log_text() or operator.process.poll() is not None,
                     f"{text!r} in the log of operator {operator.identity}", timeout)
    assert text in operator.log_text(), operator.log_text()


def test_one_leader_and_a_live_follower(cluster, namespace, start_operator):
    first = start_operator("operator-a")
    cluster.wait_for(lambda: holder(cluster, namespace, start_operator.lease) == "operator-a",
                     "operator-a to hold the Lease")
    second = start_operator("operator-b")
    wait_for_log(cluster, second, "is held by operator-a; pod operator-b waits as a follower")
    cluster.apply(pretrain_job("leader-check"), namespace)
    cluster.wait_for(lambda: first.reconciles("PretrainJob") > 0,
                     "the leader to reconcile the PretrainJob")

    status, body = second.liveness()
    assert status == 200, body
    assert json.loads(body)["leader"] is False
    assert json.loads(body)["holder"] == "operator-a"
    assert first.liveness()[0] == 200
    assert first.metric("lathe_operator_leader") == 1.0
    assert second.metric("lathe_operator_leader") == 0.0
    assert second.reconciles("PretrainJob") == 0.0
    assert holder(cluster, namespace, start_operator.lease) == "operator-a"


def test_shutdown_hands_lease_over(cluster, namespace, start_operator):
    first = start_operator("operator-a")
    cluster.wait_for(lambda: holder(cluster, namespace, start_operator.lease) == "operator-a",
                     "operator-a to hold the Lease")
    second = start_operator("operator-b")
    wait_for_log(cluster, second, "waits as a follower")
    cluster.apply(pretrain_job("handover-check"), namespace)

    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0, first.log_text()
    assert "Released Lease" in first.log_text()
    cluster.wait_for(lambda: holder(cluster, namespace, start_operator.lease) == "operator-b",
                     "operator-b to take the released Lease")
    cluster.wait_for(lambda: second.reconciles("PretrainJob") > 0,
                     "the new leader to reconcile the PretrainJob")
    assert second.metric("lathe_operator_leader") == 1.0
    assert second.liveness()[0] == 200


def test_lost_lease_stops_leader(cluster, namespace, start_operator):
    first = start_operator("operator-a")
    cluster.wait_for(lambda: holder(cluster, namespace, start_operator.lease) == "operator-a",
                     "operator-a to hold the Lease")
    wait_for_log(cluster, first, "starts reconciling as the leader")
    # Another holder with a fresh renewTime: the leader's renewals fail until its deadline.
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    cluster.kubectl("patch", "lease", start_operator.lease, "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"holderIdentity": "intruder", "renewTime": now}}))

    assert first.process.wait(timeout=60) == 1, first.log_text()
    assert "operator-a lost Lease" in first.log_text()
    assert holder(cluster, namespace, start_operator.lease) == "intruder"


def test_unanswered_renewal_stops_leader(cluster, namespace, start_operator):
    """A leader whose Lease requests get no response exits within its renew deadline, because
    another pod may take the Lease once it expires."""
    first = start_operator("operator-a")
    cluster.wait_for(lambda: holder(cluster, namespace, start_operator.lease) == "operator-a",
                     "operator-a to hold the Lease")
    wait_for_log(cluster, first, "starts reconciling as the leader")
    apiserver = cluster.bed.pids()["kube-apiserver"]
    # A stopped API server accepts connections but sends no response, as a half-open connection
    # or an overloaded server would.
    os.kill(apiserver, signal.SIGSTOP)
    try:
        code = first.process.wait(timeout=60)
    finally:
        os.kill(apiserver, signal.SIGCONT)
    assert code == 1, first.log_text()
    assert "operator-a lost Lease" in first.log_text()
