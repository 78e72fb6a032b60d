"""`lathe run --serve` with two ModelDeployments: two real tritonservers at once, until Ctrl-C.

Each deployment exports its own FineTune, a tiny random-weight classifier recorded as finished
in the workspace, and both specs name the same serving ports. `lathe run --serve` runs as a
child process in a session of its own, and the test sends SIGINT to that session's process
group, as a terminal does on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from tiny_ner_model import build_model
from tritonclient.utils import InferenceServerException

from lathe_trainer.serving import client, local_server
from lathe_trainer.serving.reference import predict_entities

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pubmed" / "05-deployment.yaml"
SAMPLE = "Mutations in the BRCA1 gene cause hereditary breast and ovarian cancer."
# ModelDeployment name, its FineTune's name and the model's seed, and its Triton model name.
DEPLOYMENTS = {"ner-a": ("tagger-a", 0, "ner_a"), "ner-b": ("tagger-b", 1, "ner_b")}
SERVING_LINE = re.compile(
    r"Triton is serving model '(?P<model>\w+)' at http://127\.0\.0\.1:(?P<http>\d+) "
    r"\(gRPC 127\.0\.0\.1:(?P<grpc>\d+), metrics http://127\.0\.0\.1:(?P<metrics>\d+)/metrics\)"
)
# The whole test took 45 to 80 s on two cores that other jobs shared, so the limit leaves
# room for slower machines.
START_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _record_finished_finetune(workspace: Path, name: str, data_dir: Path, seed: int) -> Path:
    """Write a tiny model as the finished output of FineTune `name`, as `lathe run` records
    one, and return the model folder."""
    directory = workspace / "default" / "finetune" / name
    model_dir = build_model(data_dir, directory / "output" / "model", seed=seed)
    digest = "sha256:" + f"{seed:x}" * 64
    (directory / "output" / "manifest.json").write_text(json.dumps({"digest": digest}))
    (directory / "status.json").write_text(json.dumps({
        "phase": "Succeeded",
        "artifact": {"uri": f"file://{directory / 'output'}", "digest": digest},
    }))
    return model_dir


def _ports_below_ephemeral_range(count: int) -> list[int]:
    """Return `count` ports that are free on loopback and lie below the kernel's ephemeral
    range, so that no outgoing connection takes one as its local port while the exports run."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(low // 2, low), 20)
    free = [port for port in candidates if not local_server.busy_ports((port,))]
    assert len(free) >= count, f"only {free} of the ports {candidates} are free"
    return free[:count]


def _deployment(name: str, finetune: str, model_name: str, ports: list[int]) -> dict:
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["metadata"]["name"] = name
    resource["spec"]["model"]["fineTuneRef"]["name"] = finetune
    resource["spec"]["modelName"] = model_name
    resource["spec"]["export"]["quantization"]["enabled"] = False
    resource["spec"]["export"]["checkSequenceLengths"] = [3, 20]
    resource["spec"]["serving"].update(httpPort=ports[0], grpcPort=ports[1],
                                       metricsPort=ports[2])
    return resource


def _read_status(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "default" / "modeldeployment" / name / "status.json")
                      .read_text())


def _ready(document: dict) -> dict:
    return next(c for c in document["conditions"] if c["type"] == "Ready")


def _wait_for_output(lathe: subprocess.Popen, log: Path, text: str, timeout_s: float) -> str:
    """Return the output of `lathe` once it contains `text`, and fail when lathe exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = log.read_text(errors="replace")
        if text in output:
            return output
        if lathe.poll() is not None:
            pytest.fail(f"lathe run exited with {lathe.returncode} before it printed {text!r}:"
                        f"\n{output}")
        time.sleep(1)
    pytest.fail(f"lathe run did not print {text!r} within {timeout_s} s:\n{output}")


def _tritonservers_of(workspace: Path) -> list[psutil.Process]:
    """Return the tritonserver processes that serve a model repository in `workspace`."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "tritonserver" and any(
            str(workspace) in argument for argument in process.info["cmdline"] or ()
        ):
            found.append(process)
    return found


def _shm_prefix(triton: psutil.Process) -> str:
    """Return the prefix of the Python backend's shared memory files of `triton`."""
    option = "--backend-config=python,shm-region-prefix-name="
    return next(argument.removeprefix(option) for argument in triton.cmdline()
                if argument.startswith(option))


def _still_running(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Return the processes of `processes` that still run after up to `timeout_s` seconds.

    A zombie counts as ended: a stub whose tritonserver exited first waits for a reaper.
    """
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    running = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def _listening_ports(process: psutil.Process) -> set[int]:
    return {connection.laddr.port for connection in process.net_connections(kind="tcp")
            if connection.status == psutil.CONN_LISTEN}


def _start_serving(manifest: Path, workspace: Path, data_dir: Path,
                   log: Path) -> subprocess.Popen:
    """Start `lathe run --serve` on `manifest` in a session of its own, writing to `log`."""
    with log.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "lathe.cli", "run", "-f", str(manifest), "--serve",
             "--sample", SAMPLE, "--workspace", str(workspace), "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            # A shell that starts the tests in the background ignores SIGINT in them, and
            # Python then installs no KeyboardInterrupt handler. Started from a terminal,
            # lathe has one.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            start_new_session=True,
        )


def _children_named(lathe: subprocess.Popen, name: str) -> list[psutil.Process]:
    """Return the descendants of `lathe` whose process name is `name`."""
    return [child for child in psutil.Process(lathe.pid).children(recursive=True)
            if child.name() == name]


def _kill_all(lathe: subprocess.Popen, processes: list[psutil.Process]) -> None:
    """Kill whatever a failed test left running: lathe's process group and `processes`."""
    if lathe.poll() is None:
        os.killpg(lathe.pid, signal.SIGKILL)
        lathe.wait(timeout=30)
    for process in processes:
        if process.is_running():
            process.kill()


def test_killed_serve_stops_triton(tmp_path, data_dir):
    """A SIGKILL of `lathe run --serve`, which no handler of lathe can catch, still stops its
    tritonserver, so that no server is left on the spec's ports serving a model repository
    that the next run rewrites."""
    workspace = tmp_path / "workspace"
    name, (finetune, seed, model_name) = next(iter(DEPLOYMENTS.items()))
    _record_finished_finetune(workspace, finetune, data_dir, seed)
    manifest = tmp_path / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(
        _deployment(name, finetune, model_name, _ports_below_ephemeral_range(3))))
    log = tmp_path / "lathe.log"
    lathe = _start_serving(manifest, workspace, data_dir, log)
    tritons: list[psutil.Process] = []
    try:
        output = _wait_for_output(lathe, log, "Serving until interrupted", START_TIMEOUT_S)
        tritons = _children_named(lathe, "tritonserver")
        assert len(tritons) == 1, output

        # Only lathe itself, as `kill -9 <pid>` does: Triton runs in a session of its own.
        os.kill(lathe.pid, signal.SIGKILL)
        lathe.wait(timeout=30)
        left = _still_running(tritons, timeout_s=60)
        assert not left, [process.cmdline() for process in left]
        assert _tritonservers_of(workspace) == []
    finally:
        _kill_all(lathe, tritons)


def test_two_deployments_serve_until_ctrl_c(tmp_path, data_dir):
    """Both deployments serve their own model on ports of their own, although both specs name
    the same ones, and one Ctrl-C stops both servers and records it in both status files."""
    workspace = tmp_path / "workspace"
    model_dirs = {name: _record_finished_finetune(workspace, finetune, data_dir, seed)
                  for name, (finetune, seed, _) in DEPLOYMENTS.items()}
    expected = {name: predict_entities(model_dir, [SAMPLE])[0]
                for name, model_dir in model_dirs.items()}
    # Different entities show which of the two models a server runs.
    assert expected["ner-a"] != expected["ner-b"]
    spec_ports = _ports_below_ephemeral_range(3)
    manifest = tmp_path / "deployments.yaml"
    manifest.write_text(yaml.safe_dump_all([
        _deployment(name, finetune, model_name, spec_ports)
        for name, (finetune, _, model_name) in DEPLOYMENTS.items()
    ]))

    log = tmp_path / "lathe.log"
    lathe = _start_serving(manifest, workspace, data_dir, log)
    tritons: list[psutil.Process] = []
    stubs: list[psutil.Process] = []
    try:
        output = _wait_for_output(lathe, log, "Serving until interrupted", START_TIMEOUT_S)
        tritons = _children_named(lathe, "tritonserver")
        assert len(tritons) == 2, output
        assert sorted(triton.pid for triton in _tritonservers_of(workspace)) == sorted(
            triton.pid for triton in tritons)
        # The Python backend's stubs run each model in a process of their own.
        stubs = [stub for triton in tritons for stub in triton.children(recursive=True)]
        assert stubs
        shm_prefixes = [_shm_prefix(triton) for triton in tritons]
        for prefix in shm_prefixes:
            assert list(Path("/dev/shm").glob(prefix + "*")), prefix

        served = [match.groupdict() for match in SERVING_LINE.finditer(output)]
        assert [server["model"] for server in served] == ["ner_a", "ner_b"], output
        servers = {name: {key: int(value) for key, value in server.items() if key != "model"}
                   for name, server in zip(DEPLOYMENTS, served)}
        # The first server takes the ports of its spec. The second finds them taken and
        # listens on free ones.
        first, second = servers["ner-a"], servers["ner-b"]
        assert [first["http"], first["grpc"], first["metrics"]] == spec_ports, output
        assert not {second["http"], second["grpc"], second["metrics"]} & set(spec_ports)
        assert (f"Ports {', '.join(map(str, spec_ports))} of spec.serving are in use, so "
                f"Triton listens on HTTP port {second['http']}, gRPC port {second['grpc']} "
                f"and metrics port {second['metrics']} instead.") in output
        # Each tritonserver process listens on the three ports printed for one deployment.
        listening = sorted(sorted(_listening_ports(triton)) for triton in tritons)
        printed = sorted(sorted(server.values()) for server in servers.values())
        assert listening == printed

        for name, (_, _, model_name) in DEPLOYMENTS.items():
            ports = servers[name]
            written = _read_status(workspace, name)
            assert written["phase"] == "Ready", written
            assert _ready(written)["status"] == "True", written
            assert _ready(written)["reason"] == "ServerReady", written
            assert written["endpoint"] == f"http://127.0.0.1:{ports['http']}"
            http_url = written["endpoint"].removeprefix("http://")
            grpc_url = f"127.0.0.1:{ports['grpc']}"
            assert client.infer_entities(http_url, model_name, [SAMPLE])[0] == expected[name]
            assert client.infer_entities(grpc_url, model_name, [SAMPLE], "grpc")[0] == (
                expected[name])
            other_model = next(other for _, _, other in DEPLOYMENTS.values()
                               if other != model_name)
            with pytest.raises(InferenceServerException, match="unknown model|not found"):
                client.infer_entities(http_url, other_model, [SAMPLE])

        # Ctrl-C: the terminal sends SIGINT to the foreground process group.
        os.killpg(lathe.pid, signal.SIGINT)
        lathe.wait(timeout=120)
        output = log.read_text(errors="replace")
        assert lathe.returncode == 0, output
        assert "Stopping Triton." in output
        assert "Interrupted" not in output
        left = _still_running(tritons + stubs, timeout_s=5)
        assert not left, [process.cmdline() for process in left]
        assert _tritonservers_of(workspace) == []
        for prefix in shm_prefixes:
            assert not list(Path("/dev/shm").glob(prefix + "*")), prefix
        all_ports = tuple(port for server in servers.values() for port in server.values())
        assert local_server.busy_ports(all_ports) == []
        for name in DEPLOYMENTS:
            written = _read_status(workspace, name)
            assert _ready(written)["status"] == "False", written
            assert _ready(written)["reason"] == "ServerNotReady", written
            assert written["phase"] == "Pending", written
            assert "endpoint" not in written
    finally:
        _kill_all(lathe, tritons + stubs)
