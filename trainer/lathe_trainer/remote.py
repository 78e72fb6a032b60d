"""Stage inputs and outputs on object stores (s3://), staged through local directories.

Every stage reads and writes local directories. When the config names a remote URI (any fsspec
URL other than file:// and plain paths), `staged` gives the stage a config that points at a
scratch directory on the node instead:

- Each remote input is downloaded once per node, before the stage starts.
- A remote output is downloaded first as well, so that a retried attempt in a new pod finds
  the checkpoints and progress of the attempt before it. Global rank 0 then mirrors the local
  output to the remote one every LATHE_SYNC_SECONDS while the stage runs, and once more when it
  ends, whether it succeeded or failed.

The mirror uploads the files that completion markers name last (state.json, result.json and
manifest.json), so a reader of the remote output finds a checkpoint or the manifest only after
the files they describe. It also deletes remote files that the stage deleted locally, such as
pruned checkpoints.

Neither the mirror nor `download` checks what it copies. A checkpoint's state.json records the
SHA-256 of the checkpoint's files, and the stage checks them when it resumes (see
training.checkpoint and finetune.checkpoint), so a file damaged on the store or in a copy is
skipped for the checkpoint before it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from lathe_trainer.stage import MANIFEST, StageConfig
from lathe_trainer.training import storage

log = logging.getLogger(__name__)

# Files whose presence marks a directory, or the whole output, as complete.
MARKERS = frozenset({"state.json", "result.json", MANIFEST})
DEFAULT_SYNC_SECONDS = 15.0
COMPLETE = ".complete"
# The directory of restart state in every training stage's output (see training.checkpoint).
CHECKPOINTS = "checkpoints"


@contextmanager
def staged(config: StageConfig) -> Iterator[StageConfig]:
    """Yield the config with every remote input and output replaced by a local directory."""
    remote_inputs = {
        role: item for role, item in config.inputs.items() if storage.is_remote(item.uri)
    }
    remote_output = storage.is_remote(config.output_uri)
    if not remote_inputs and not remote_output:
        yield config
        return

    scratch = scratch_dir(config)
    inputs = dict(config.inputs)
    with node_lock(scratch):
        for role, item in remote_inputs.items():
            local = scratch / "inputs" / role
            # An upstream's checkpoints are its own restart state, never an input downstream.
            download_once(item.uri, local, skip=(f"{CHECKPOINTS}/",))
            inputs[role] = item.model_copy(update={"uri": f"file://{local}"})
        output_uri = config.output_uri
        if remote_output:
            local_output = scratch / "output"
            # A PretrainJob writes its checkpoints straight to the remote output, where every
            # node reads the same ones (lathe_trainer.pretrain.stage._checkpoint_root).
            skip = (f"{CHECKPOINTS}/",) if config.kind == "PretrainJob" else ()
            download_once(config.output_uri, local_output, skip=skip)
            output_uri = f"file://{local_output}"

    staged_from = {inputs[role].uri: item.uri for role, item in remote_inputs.items()}
    if remote_output:
        staged_from[output_uri] = config.output_uri
    local_config = config.model_copy(
        update={"inputs": inputs, "output_uri": output_uri, "staged_from": staged_from}
    )
    # Only global rank 0 writes the output, so only it mirrors. A Corpus worker runs without
    # torchrun and so has no RANK; its completion index serves as its rank.
    rank = os.environ.get("RANK") or os.environ.get("JOB_COMPLETION_INDEX") or "0"
    if not remote_output or int(rank) != 0:
        yield local_config
        return

    mirror = Mirror(scratch / "output", config.output_uri)
    # A manifest left by an earlier run of this output would mark the new run as finished.
    mirror.remove(MANIFEST)
    mirror.start()
    previous_handler = _exit_on_sigterm()
    try:
        yield local_config
    except BaseException:
        # The stage's own error decides the exit code, so a failed last upload only logs.
        try:
            mirror.stop()
        except Exception as error:  # noqa: BLE001 - logged, the stage's error is re-raised
            log.error("The last upload of the output to %s failed: %s.", config.output_uri,
                      error)  # fmt: skip
        raise
    else:
        mirror.stop()
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm():
    """Turn SIGTERM into SystemExit, so that the last upload runs before the process ends.

    The kubelet sends SIGTERM when a pod is deleted (suspend, preemption), and torchrun sends
    it to the other workers when one fails. Returns the handler it replaced, or None off the
    main thread, where Python cannot set one.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum, frame):
        log.warning("Received SIGTERM; uploading the output before exiting.")
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handle)


def fetch(uri: str) -> Path:
    """Return a local copy of a file or directory on an object store, downloaded once per node.

    Data paths (Corpus sources, FineTune data and base models) under an s3:// data directory
    come through here (lathe_trainer.stage.resolve_data_path). For a URI that does not exist it
    returns a path that does not exist either, so the stage reports the bad field as it does for
    a local path.
    """
    root = Path(os.environ.get("LATHE_SCRATCH_DIR") or tempfile.gettempdir()) / "lathe-data"
    folder = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (uri.rstrip("/").rsplit("/", 1)[-1] or "data")
    marker = folder / COMPLETE
    with node_lock(folder):
        if not marker.exists():
            filesystem, path = storage.resolve(uri)
            if filesystem.isdir(path):
                download(uri, target)
            elif filesystem.isfile(path):
                filesystem.get_file(path, str(target))
            else:
                return target
            marker.touch()
    return target


def exit_process(code: int) -> NoReturn:
    """End a stage process with `code` once its logs are flushed, without the interpreter's
    teardown.

    Two-process FSDP runs on gloo sometimes died with SIGABRT after their last log line
    ("terminate called without an active exception": a C++ thread object destroyed while
    still running, during the teardown at exit), and so did runs that had staged through
    s3:// with obstore's threads. torchrun then reported the finished stage as failed. Every
    output and the manifest are written before this point, so nothing is lost by skipping
    the teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def scratch_dir(config: StageConfig, root: Path | None = None) -> Path:
    """Return the node-local directory that contains a stage's staged inputs and output.

    `root` defaults to LATHE_SCRATCH_DIR, else the system's temporary directory.
    """
    root = root or Path(os.environ.get("LATHE_SCRATCH_DIR") or tempfile.gettempdir())
    path = root / scratch_name(config)
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_name(config: StageConfig) -> str:
    """Return the name of scratch_dir's folder, which only runs of the same stage key share."""
    key = config.stage_key.rpartition(":")[2][:16]
    return f"lathe-{config.kind.lower()}-{config.namespace}-{config.name}-{key}"


@contextmanager
def node_lock(scratch: Path) -> Iterator[None]:
    """Hold a file lock on `scratch`, so that one process per node downloads or writes a
    shared file while the others wait."""
    with (scratch / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_once(uri: str, local: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the tree at `uri` into `local`, unless an earlier process on this node did."""
    # NB: the marker sits beside the tree, because a file inside an output would be digested.
    marker = local.parent / f"{local.name}{COMPLETE}"
    if marker.exists():
        return
    download(uri, local, skip)
    marker.touch()


def download(uri: str, local: Path, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under `uri` into the directory `local`, except relative paths that start
    with a prefix in `skip`; return the number of files copied."""
    local.mkdir(parents=True, exist_ok=True)
    filesystem, base = storage.resolve(uri)
    count = 0
    for path in filesystem.find(base):
        relative = path[len(base):].lstrip("/")
        if relative.startswith(skip):
            continue
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        filesystem.get_file(path, str(target))
        count += 1
    log.info("Downloaded %d files from %s to %s.", count, uri, local)
    return count


class Mirror:
    """Mirror a local directory to a remote one, every interval and once more at the end."""

    def __init__(self, local: Path, uri: str, interval: float | None = None):
        self.local = local
        self.uri = uri
        self.interval = interval or float(os.environ.get("LATHE_SYNC_SECONDS",
                                                         DEFAULT_SYNC_SECONDS))  # fmt: skip
        self.filesystem, self.base = storage.resolve(uri)
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output-mirror", daemon=True)
        self._lock = threading.Lock()
        self._seed()

    def _seed(self) -> None:
        """Record the files that the download brought, which the remote already has."""
        for path in self._local_files():
            stat = path.stat()
            self._uploaded[path.relative_to(self.local).as_posix()] = (stat.st_size,
                                                                       stat.st_mtime_ns)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self.sync()
        log.info("Uploaded the output to %s.", self.uri)

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.sync()
            except Exception as error:  # noqa: BLE001 - the next round or the final sync retries
                log.warning("Mirroring the output to %s failed: %s; trying again in %.0f s.",
                            self.uri, error, self.interval)

    def _local_files(self) -> list[Path]:
        """Return the output's files, without those still being written under temporary names."""
        return [path for path in sorted(self.local.rglob("*")) if path.is_file()
                and not any(part.startswith(".tmp") or part.endswith(".tmp")
                            for part in path.relative_to(self.local).parts)]  # fmt: skip

    def remove(self, relative: str) -> None:
        """Delete one file of the output, locally and remotely."""
        with self._lock:
            (self.local / relative).unlink(missing_ok=True)
            try:
                self.filesystem.rm_file(f"{self.base}/{relative}")
            except FileNotFoundError:
                pass
            self._uploaded.pop(relative, None)

    def sync(self) -> None:
        """Upload new and changed files, markers last, then delete what is gone locally."""
        with self._lock:
            files = self._local_files()
            changed = []
            for path in files:
                stat = path.stat()
                relative = path.relative_to(self.local).as_posix()
                if self._uploaded.get(relative) != (stat.st_size, stat.st_mtime_ns):
                    changed.append((path.name in MARKERS, relative, path, stat))
            # A marker that is rewritten goes first, so that it never describes new data yet
            # to come; the new marker is uploaded after that data.
            for is_marker, relative, _, _ in changed:
                if is_marker and relative in self._uploaded:
                    try:
                        self.filesystem.rm_file(f"{self.base}/{relative}")
                    except FileNotFoundError:
                        pass
            for _, relative, path, stat in sorted(changed):
                self.filesystem.put_file(str(path), f"{self.base}/{relative}")
                self._uploaded[relative] = (stat.st_size, stat.st_mtime_ns)
            present = {path.relative_to(self.local).as_posix() for path in files}
            deleted = set(self._uploaded) - present
            # Markers go first, so a pruned checkpoint is incomplete before its data is deleted.
            for relative in sorted(deleted, key=lambda item: (Path(item).name not in MARKERS, item)):
                try:
                    self.filesystem.rm_file(f"{self.base}/{relative}")
                except FileNotFoundError:
                    pass
                del self._uploaded[relative]
