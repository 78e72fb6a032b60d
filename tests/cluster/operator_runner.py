"""Run the Lathe operator in-process with kopf.testing.KopfRunner against the cluster bed."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kopf.testing import KopfRunner

import loopback_only

# Seconds between progress refreshes in the suite; the default in production is 15.
PROGRESS_INTERVAL = "2"


@dataclass
class RunningOperator:
    runner: KopfRunner
    metrics_url: str
    artifact_root: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def run_operator(kubeconfig: Path, artifact_root: Path, timeout: float = 60.0):
    """Start the operator on every namespace and yield once its metrics endpoint responds.

    The operator connects only to loopback addresses (see loopback_only).
    """
    loopback_only.install()
    port = _free_port()
    settings = {
        "KUBECONFIG": str(kubeconfig),
        "LATHE_ARTIFACT_ROOT": f"file://{artifact_root}",
        "LATHE_METRICS_PORT": str(port),
        "LATHE_METRICS_HOST": "127.0.0.1",
        "LATHE_PROGRESS_INTERVAL": PROGRESS_INTERVAL,
        "LATHE_TRAINER_IMAGE": "lathe-trainer:test",
        "LATHE_SYNC_IMAGE": "lathe-trainer:test",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    args = ["run", "--standalone", "--all-namespaces", "-m", "lathe.k8s.handlers"]
    try:
        with KopfRunner(args, timeout=timeout) as runner:
            url = f"http://127.0.0.1:{port}/metrics"
            _wait_for_http(url, timeout)
            yield RunningOperator(runner, url, artifact_root)
        if runner.exception is not None:
            raise runner.exception
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_for_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"The operator's metrics endpoint {url} did not answer in "
                                   f"{timeout:.0f} s.") from None
            time.sleep(0.5)
