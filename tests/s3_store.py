"""A real S3-compatible object store for the s3:// tests: SeaweedFS's `weed mini` on loopback.

scripts/tools/seaweedfs.sh builds the binary once. Every port is chosen free on 127.0.0.1, the
admin UI, WebDAV and the table catalogs are off, and telemetry is off, so the store talks to
nothing but its clients on this machine. It requires signed requests with the credentials in
`env`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "scripts" / "tools" / "seaweedfs.sh"
BUCKET = "lathe"
ACCESS_KEY = "lathetest"
SECRET_KEY = "lathetestsecret"
START_TIMEOUT_SECONDS = 60.0


def build() -> Path:
    """Build the weed binary once and return its path; raise RuntimeError if that fails."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _free_ports(count: int) -> list[int]:
    """Return free loopback ports below 50000, because weed listens on each port + 10000 too."""
    ports: list[int] = []
    sockets = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sockets.append(sock)
            if port < 50000 and _is_free(port + 10000):
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class S3Store:
    """A running `weed mini` with one bucket, BUCKET."""

    def __init__(self, binary: Path, work_dir: Path):
        self.binary = binary
        self.work_dir = work_dir
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    @property
    def env(self) -> dict[str, str]:
        """The variables that point an S3 client (obstore, the AWS SDKs) at this store."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> None:
        master, volume, filer, s3, admin = _free_ports(5)
        data = self.work_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.binary), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false", f"-admin.port={admin}", "-admin.port.legacy=0",
            "-master.telemetry=false", "-master.telemetry.url=http://127.0.0.1:1/",
            f"-bucket={BUCKET}",
        ]
        # weed mini creates a user with these credentials and then requires signed requests.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log_path = self.work_dir / "weed.log"
        log = self.log_path.open("w")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.endpoint = f"http://127.0.0.1:{s3}"
        self._wait_for_bucket()

    def _wait_for_bucket(self) -> None:
        # The gateway starts before the bucket exists, so a signed listing of the bucket is what
        # shows that the store is ready.
        from obstore.store import S3Store as ObjectStore

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self.process.returncode}; "
                                   f"see {self.log_path}.")
            try:
                store = ObjectStore(BUCKET, endpoint=self.endpoint, access_key_id=ACCESS_KEY,
                                    secret_access_key=SECRET_KEY, region="us-east-1",
                                    client_options={"allow_http": True})
                store.list().collect()
                return
            except Exception as error:  # noqa: BLE001 - not up yet; retried until the deadline
                last_error = error
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"The S3 gateway at {self.endpoint} did not serve bucket {BUCKET!r} "
                           f"within {START_TIMEOUT_SECONDS:.0f} s: {last_error}. See "
                           f"{self.log_path}.")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
