"""Run a real `tritonserver` from the `nvidia-pytriton` wheel on loopback, for `lathe run`.

`start_triton(repository, workdir)` returns a started, ready server; use it as a context manager
so the server stops. The wheel's `tritonserver` runs Python-backend models only under these
conditions (Triton 2.51 from nvidia-pytriton 0.7.0), and this module sets each one up:

1. The backend stub of the running Python version sits next to `libtriton_python.so`. We copy
   the wheel's `backends/` into `workdir` and add the stub there; site-packages stays untouched.
2. `LD_LIBRARY_PATH` starts with the lib directory of the running Python build, then the wheel's
   `nvidia_pytriton.libs/`. Another libpython of the same minor version (such as Debian's) mixed
   with this build's standard library breaks `multiprocessing` in the stub.
3. `PATH` starts with the `bin/` of the running environment, because the stub finds its
   `site-packages` through the first `python3` on `PATH`.
4. numpy is below 2; with numpy 2 the stub returns empty tensors and garbled strings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lathe_trainer.processes import die_with_parent

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
LOOPBACK = "127.0.0.1"
# A character that a shell reads as more than a letter of a word. The Python backend of Triton
# 2.51 (nvidia-pytriton 0.7.0) starts each model's stub through a shell without quoting the
# stub and model paths. A path with a space (or `;`, `$`, a quote) splits that command, the
# log shows `sh: 1: /path: not found`, and the model never loads.
_SHELL_UNSAFE = re.compile(r"[^\w@%+=:,./-]")


class TritonStartError(RuntimeError):
    """tritonserver could not be set up, exited early or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstallation:
    """The files of the `nvidia-pytriton` wheel that running `tritonserver` needs."""

    binary: Path
    backends: Path
    stubs: Path
    libraries: Path


def find_installation() -> TritonInstallation:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError(
            "The nvidia-pytriton package is not installed; install the `serving` extra "
            "(pip install 'lathe[serving]')."
        )
    package = Path(list(spec.submodule_search_locations)[0])
    server = package / "tritonserver"
    installation = TritonInstallation(
        binary=server / "bin" / "tritonserver",
        backends=server / "backends",
        stubs=server / "python_backend_stubs",
        libraries=package.parent / "nvidia_pytriton.libs",
    )
    for path in (installation.binary, installation.backends / "python", installation.libraries):
        if not path.exists():
            raise TritonStartError(f"{path} is missing from the nvidia-pytriton installation.")
    return installation


@dataclass(frozen=True)
class ModelPython:
    """The Python interpreter and packages that the repository's Python models run in."""

    executable: Path
    version: str
    library_dir: str
    # Directories put on PYTHONPATH, as the Triton image puts its packages there.
    path: tuple[str, ...] = ()

    @classmethod
    def current(cls) -> ModelPython:
        """Return the running interpreter and its environment."""
        # NB: the directory of sys.executable, not of its resolved symlink, is the venv's bin/.
        return cls(Path(sys.executable), f"{sys.version_info.major}.{sys.version_info.minor}",
                   sysconfig.get_config_var("LIBDIR"))  # fmt: skip

    @classmethod
    def of(cls, executable: Path, path: tuple[str, ...] = ()) -> ModelPython:
        """Return another interpreter, with packages from the directories in `path`."""
        script = ("import sys, sysconfig; "
                  "print(f'{sys.version_info.major}.{sys.version_info.minor}'); "
                  "print(sysconfig.get_config_var('LIBDIR'))")  # fmt: skip
        output = subprocess.run([str(executable), "-c", script], capture_output=True, text=True,
                                check=True, timeout=60).stdout.split("\n")  # fmt: skip
        return cls(Path(executable), output[0], output[1], tuple(path))


def check_numpy() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonStartError(
            f"numpy {numpy.__version__} is installed, but the Triton Python backend stub of "
            "nvidia-pytriton needs numpy<2; install numpy<2 in this environment."
        )


def prepare_backends(
    installation: TritonInstallation, workdir: Path, python: ModelPython | None = None
) -> Path:
    """Copy the wheel's backends into workdir and put the models' Python's stub next to the
    backend."""
    version = (python or ModelPython.current()).version
    stub = installation.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(
            f"nvidia-pytriton has no Python backend stub for Python {version} ({stub}); run "
            "Lathe with a Python version that the wheel supports."
        )
    backends = workdir / "backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(installation.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / stub.name)
    return backends


def check_backends(repository: Path, backends: Path) -> None:
    """Fail before starting when a model in the repository needs a backend we do not have."""
    for config in sorted(repository.glob("*/config.pbtxt")):
        match = re.search(r'^backend:\s*"([^"]+)"', config.read_text(), re.MULTILINE)
        if match and not (backends / match.group(1)).is_dir():
            raise TritonStartError(
                f"{config} needs the Triton backend {match.group(1)!r}, which the local "
                f"tritonserver lacks (it has: {sorted(p.name for p in backends.iterdir())}); "
                "export with the `python` model backend to serve locally."
            )


def server_environment(python: ModelPython | None = None) -> dict[str, str]:
    python = python or ModelPython.current()
    installation = find_installation()
    env = dict(os.environ)
    libraries = [python.library_dir, str(installation.libraries)]
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    env["PATH"] = os.pathsep.join([str(python.executable.parent), env.get("PATH", "")])
    if python.path:
        env["PYTHONPATH"] = os.pathsep.join(python.path)
    return env


def free_ports(count: int) -> list[int]:
    """Return ports that were free on loopback a moment ago (another process may take them)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass
class TritonServer:
    """A running tritonserver process and its loopback endpoints."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    shm_prefix: str
    _log_file: object = field(default=None, repr=False)
    # The folder of symlinks that Triton reads the repository and backends through, removed
    # on stop (see shell_safe_paths).
    links: Path | None = None

    @property
    def http_url(self) -> str:
        """`host:port` of the HTTP endpoint, as `tritonclient.http` expects it."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def endpoints(self) -> dict[str, str]:
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url}

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was "
                    f"ready; its log {self.log_path} ends with:\n{self.log_tail()}"
                )
            if self.is_ready():
                log.info("tritonserver is ready at %s.", self.endpoints())
                return
            time.sleep(0.5)
        raise TritonStartError(
            f"tritonserver was not ready within {timeout_s:.0f} s; its log {self.log_path} "
            f"ends with:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its shared memory regions."""
        if self.process.poll() is None:
            log.info("Stopping tritonserver (pid %d).", self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tritonserver (pid %d) did not stop within %.0f s; killing its process "
                    "group.", self.process.pid, timeout_s,
                )
                kill_group(self.process.pid)
                self.process.wait(timeout=timeout_s)
        # Backend stubs run in the server's process group; reap any that outlived it.
        kill_group(self.process.pid)
        removed = remove_shm_regions(self.shm_prefix)
        if removed:
            log.info("Removed %d shared memory regions left by tritonserver.", removed)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.links is not None:
            # The folder contains only symlinks, and rmtree removes them without following.
            shutil.rmtree(self.links, ignore_errors=True)
            self.links = None

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def remove_shm_regions(prefix: str) -> int:
    removed = 0
    for path in SHM_DIR.glob(prefix + "*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def busy_ports(ports: tuple[int, ...]) -> list[int]:
    """Return the ports of `ports` that cannot be bound on loopback now."""
    busy = []
    with contextlib.ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket())
            # With SO_REUSEADDR, only a socket that still listens on the port fails the bind,
            # and not the connections an earlier server left in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                busy.append(port)
    return busy


def shell_safe_paths(repository: Path, workdir: Path) -> tuple[Path, Path, Path | None]:
    """Return paths to `repository` and `workdir` that Triton's stub command can use.

    When either path has a character that the shell would read otherwise (_SHELL_UNSAFE), both
    are replaced by symlinks in a new temporary folder. That folder is returned third, so that
    the caller removes it. Otherwise the paths are returned as they are, with None.
    """
    if not (_SHELL_UNSAFE.search(str(repository)) or _SHELL_UNSAFE.search(str(workdir))):
        return repository, workdir, None
    links = Path(tempfile.mkdtemp(prefix="lathe-triton-"))
    if _SHELL_UNSAFE.search(str(links)):
        shutil.rmtree(links, ignore_errors=True)
        raise TritonStartError(
            f"the model repository {repository} or the folder {workdir} contains a space or "
            "another shell character, which the Triton Python backend cannot start models "
            f"from, and the temporary folder {links.parent} has one too; set TMPDIR to a "
            "folder without such characters, or use a workspace path without them."
        )
    (links / "repository").symlink_to(repository, target_is_directory=True)
    (links / "work").symlink_to(workdir, target_is_directory=True)
    log.info("Serving %s through the symlink folder %s, because its path contains characters "
             "that Triton's Python backend does not quote.", repository, links)
    return links / "repository", links / "work", links


def launch(repository: Path, workdir: Path, backends: Path, log_path: Path,
           python: ModelPython | None = None,
           ports: tuple[int, int, int] | None = None) -> TritonServer:  # fmt: skip
    """Start tritonserver on `ports` (HTTP, gRPC, metrics), or on free ports when None."""
    http_port, grpc_port, metrics_port = ports or free_ports(3)
    # A prefix of our own, under Triton's default one, so that cleanup removes only our regions.
    shm_prefix = f"{SHM_PREFIX}lathe_{uuid.uuid4().hex[:12]}_"
    command = [
        str(find_installation().binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--disable-auto-complete-config",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--http-address={LOOPBACK}", f"--http-port={http_port}",
        f"--grpc-address={LOOPBACK}", f"--grpc-port={grpc_port}",
        f"--metrics-address={LOOPBACK}", f"--metrics-port={metrics_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
    ]
    log_file = log_path.open("ab")
    log.info("Starting tritonserver on %s (HTTP port %d); logging to %s.",
             LOOPBACK, http_port, log_path)
    process = subprocess.Popen(
        command, cwd=workdir, env=server_environment(python), stdin=subprocess.DEVNULL,
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        # A killed `lathe run --serve` would otherwise leave Triton serving on the spec's ports
        # while the next run marks it stopped and rewrites its model repository.
        preexec_fn=die_with_parent(),
    )
    return TritonServer(process, http_port, grpc_port, metrics_port, log_path, shm_prefix,
                        log_file)


def start_triton(
    repository: Path, workdir: Path, ready_timeout_s: float = 180.0, attempts: int = 3,
    python: ModelPython | None = None, ports: tuple[int, int, int] | None = None,
) -> TritonServer:
    """Start tritonserver on `repository` and wait until `/v2/health/ready` answers 200.

    `workdir` receives the backend copy and `tritonserver.log`. A start that fails because a
    chosen port was taken in the meantime is retried with new ports, up to `attempts` times.
    The Python models run in `python`, by default the running interpreter and its packages.
    `ports` (HTTP, gRPC, metrics) are used when all three are free on loopback; otherwise, and
    by default, free ports are picked.
    """
    repository, workdir = Path(repository).resolve(), Path(workdir).resolve()
    if not repository.is_dir():
        raise TritonStartError(f"The model repository {repository} does not exist.")
    if python is None:
        check_numpy()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "tritonserver.log"
    # The paths Triton reads from are symlinks without shell characters when the real ones
    # have some. They are not resolved again, because Triton would then see the real paths.
    repository, workdir, links = shell_safe_paths(repository, workdir)
    try:
        server = _start_ready(repository, workdir, log_path, ready_timeout_s, attempts, python,
                              ports)
    except BaseException:
        if links is not None:
            shutil.rmtree(links, ignore_errors=True)
        raise
    server.links = links
    return server


def _start_ready(
    repository: Path, workdir: Path, log_path: Path, ready_timeout_s: float, attempts: int,
    python: ModelPython | None, ports: tuple[int, int, int] | None,
) -> TritonServer:
    """Start tritonserver until it is ready; retry with new ports when a port was taken."""
    backends = prepare_backends(find_installation(), workdir, python)
    check_backends(repository, backends)
    attempt = 1
    busy = busy_ports(ports) if ports else []
    requested = ports if ports and not busy else None
    if busy:
        log.info("Port %s is in use on %s, so tritonserver gets free ports instead of %s.",
                 ", ".join(map(str, busy)), LOOPBACK, ", ".join(map(str, ports)))
    while True:
        server = launch(repository, workdir, backends, log_path, python,
                        requested if attempt == 1 else None)
        try:
            server.wait_ready(ready_timeout_s)
            return server
        except BaseException as error:
            # tritonserver runs in its own session, so nothing else stops it on an interrupt.
            server.stop()
            if not isinstance(error, TritonStartError):
                raise
            port_taken = "address already in use" in server.log_tail(200).lower()
            if not port_taken or attempt >= attempts:
                raise
        attempt += 1
        log.warning("A tritonserver port was taken; retrying with new ports (attempt %d of %d).",
                    attempt, attempts)
