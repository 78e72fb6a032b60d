"""How `lathe run` stops the processes of a stage it gives up on or is interrupted in."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from lathe.local.runner import MAX_ERROR_LINES, _scan_log, _stop_processes

# A parent and a child that both ignore SIGTERM, as a torchrun whose worker hangs in a
# collective would; the parent prints the child's pid.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until init, its new parent, reaps it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_kills_workers_ignoring_sigterm():
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    assert alive(child)

    _stop_processes([parent], timeout_s=1.0)

    assert parent.returncode is not None
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_stop_kills_process_without_own_group():
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                               text=True)
    child = int(process.stdout.readline())
    _stop_processes([process], timeout_s=1.0)
    assert process.returncode is not None
    os.kill(child, 9)


# A torchrun worker that ignores SIGTERM; torch's agent starts it in a session of its own.
STUBBORN_WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "a") as pids:
    pids.write(f"{os.getpid()}\\n")
time.sleep(600)
"""


def test_stop_kills_torchrun_workers(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(STUBBORN_WORKER)
    pids = tmp_path / "pids"
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(worker), str(pids)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while (not pids.is_file() or len(pids.read_text().split()) < 2) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2

    _stop_processes([torchrun], timeout_s=2.0)

    assert torchrun.returncode is not None
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


def test_second_interrupt_kills_at_once():
    """Ctrl-C while lathe waits for stopping stages kills them and is raised again."""
    import signal

    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    child = int(process.stdout.readline())

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            _stop_processes([process], timeout_s=60.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert process.returncode is not None
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


# A lathe process that starts a stage as the runner does and prints the stage's pid.
LATHE_WITH_STAGE = """
import subprocess, sys, time
from lathe_trainer.processes import die_with_parent
stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True, preexec_fn=die_with_parent())
print(stage.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_stage_ends_when_lathe_is_killed():
    """SIGKILL reaches no handler of lathe, and the stage runs in a session of its own, so
    only the death signal ends it instead of leaving it writing into the workspace."""
    lathe = subprocess.Popen([sys.executable, "-c", LATHE_WITH_STAGE], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    stage = int(lathe.stdout.readline())
    assert alive(stage)
    lathe.kill()
    lathe.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(stage)


def test_scan_log_keeps_tail_and_error():
    lines = [f"2026-12-05 10:00:{i % 60:02d},000 step {i}" for i in range(10_000)]
    lines += ["error: Corpus default/c: spec.sources: bad", "  detail line",
              "Traceback (most recent call last):", "  File x"]
    tail, error = _scan_log(iter(lines))
    assert error == "Corpus default/c: spec.sources: bad\n  detail line"
    assert tail.splitlines() == lines[-20:]


def test_scan_log_bounds_message():
    lines = ["error: first"] + [f"  item {i}" for i in range(1000)]
    _, error = _scan_log(lines)
    assert len(error.splitlines()) == MAX_ERROR_LINES


def test_workspace_that_is_a_file_rejected(tmp_path):
    from lathe.errors import WorkspaceError
    from lathe.local.runner import LocalRunner

    workspace = tmp_path / "workspace"
    workspace.write_text("")
    with pytest.raises(WorkspaceError, match=r"--workspace '.*workspace' is a file"):
        LocalRunner(workspace, tmp_path).check([])


def test_workspace_in_use_rejected(tmp_path):
    """A second run on a workspace that another process is running in fails at once, naming
    the other process, and the workspace is free again once that process is gone."""
    from lathe.errors import WorkspaceError
    from lathe.local.runner import LocalRunner, workspace_lock

    workspace = tmp_path / "workspace"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from lathe.local.runner import "
         "workspace_lock\nwith workspace_lock(Path(sys.argv[1])):\n    print('locked', "
         "flush=True)\n    time.sleep(60)", str(workspace)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkspaceError, match=rf"in use by another lathe run \(pid "
                           rf"{holder.pid}\); wait for it to finish"):
            LocalRunner(workspace, tmp_path).run([])
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(workspace):
        pass


def test_workspace_held_while_serving(tmp_path):
    """`lathe run` keeps the lock after its stages, while Triton serves from the workspace, and
    its own stages run under it."""
    from lathe.errors import WorkspaceError
    from lathe.local.runner import LocalRunner

    workspace = tmp_path / "workspace"
    serving = LocalRunner(workspace, tmp_path)
    with serving.hold_workspace():
        assert serving.run([]) == {}
        with pytest.raises(WorkspaceError, match="in use by another lathe run"):
            LocalRunner(workspace, tmp_path).run([])
    assert LocalRunner(workspace, tmp_path).run([]) == {}


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to "
                    "mount a read-only directory without root")
def test_read_only_workspace_rejected(tmp_path):
    """On a read-only file system, validate and run name the workspace and the fix instead of
    failing with a traceback."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    script = (
        "from pathlib import Path; from lathe import cli; import sys; "
        f"sys.exit(cli.main(['validate', '-f', {str(tmp_path / 'corpus.yaml')!r}, '--workspace', "
        f"{str(read_only / 'workspace')!r}]))"
    )
    # The workspace is checked before the data files, so the source need not exist.
    (tmp_path / "corpus.yaml").write_text(
        "apiVersion: lathe.dev/v1alpha1\nkind: Corpus\nmetadata: {name: small}\n"
        "spec:\n  sources: [{name: a, format: text, path: a.txt}]\n"
    )
    mount = (f"mount --bind {read_only} {read_only} && "
             f"mount -o remount,bind,ro {read_only} && exec {sys.executable} -c \"$0\"")
    completed = subprocess.run(["unshare", "-rm", "sh", "-c", mount, script],
                               capture_output=True, text=True, timeout=120)
    if "Operation not permitted" in completed.stderr and "mount" in completed.stderr:
        pytest.skip(f"this machine does not allow a private mount: {completed.stderr.strip()}")
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "cannot be written" in completed.stderr
    assert "pass a writable directory" in completed.stderr


def test_resume_points_name_each_phase(tmp_path):
    """A FineTune resumes each phase from its own checkpoints, so each phase is named."""
    from lathe.local.runner import _resume_points
    from lathe_trainer.training import storage

    for phase, step in (("lora", 300), ("lora", 200), ("scratch", 20)):
        folder = tmp_path / "checkpoints" / phase / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    # A step folder without its state file was cut off while being written.
    (tmp_path / "checkpoints" / "scratch" / "step-00000040").mkdir()
    assert _resume_points(*storage.resolve(f"file://{tmp_path}")) == (
        "lora step 300, scratch step 20")


def _reference_error(tmp_path, written: dict) -> str:
    """Record `written` as the status.json of Corpus 'pubmed' in a workspace, check a Tokenizer
    that references it without its file, and return the error message."""
    import json

    from lathe import loader
    from lathe.errors import InvalidResourceError
    from lathe.local.runner import LocalRunner

    stage = tmp_path / "workspace" / "default" / "corpus" / "pubmed"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "status.json").write_text(json.dumps(written))
    tokenizer = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Tokenizer", "metadata": {"name": "tok"},
        "spec": {"corpusRef": {"name": "pubmed"}},
    }, "tokenizer.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        LocalRunner(tmp_path / "workspace", tmp_path).check([tokenizer])
    return str(raised.value)


def test_failed_reference_explained(tmp_path):
    """A reference to a stage whose last run in the workspace failed names the failure and
    where its last good output is kept, instead of calling the name unknown."""
    stage = tmp_path / "workspace" / "default" / "corpus" / "pubmed"
    (stage / "previous-output").mkdir(parents=True)
    (stage / "previous-output" / "manifest.json").write_text("{}")
    message = _reference_error(tmp_path, {"phase": "Failed"})
    assert "its last run in the workspace has phase Failed" in message
    assert f"kept in {stage / 'previous-output'}" in message
    assert message.endswith("pass its file too with -f to run it again.")


def test_moved_output_reference_explained(tmp_path):
    """A stage that succeeded but whose recorded output is gone, as after the workspace was
    moved, is not called Succeeded and rejected without a reason."""
    moved = f"file://{tmp_path / 'old-workspace' / 'default' / 'corpus' / 'pubmed' / 'output'}"
    message = _reference_error(
        tmp_path, {"phase": "Succeeded", "artifact": {"uri": moved, "digest": "sha256:0"}})
    assert f"succeeded, but its recorded output {moved} no longer holds that output" in message
    assert "has phase Succeeded" not in message


def test_every_resource_checked_before_raising(tmp_path):
    """Missing files of two resources are reported together, as the loader reports every
    invalid file."""
    from lathe import loader
    from lathe.errors import InvalidResourcesError
    from lathe.local.runner import LocalRunner

    corpus = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "c"},
        "spec": {"sources": [{"name": "a", "format": "text", "path": "missing-a.txt"}]},
    }, "corpus.yaml")
    other = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "d"},
        "spec": {"sources": [{"name": "b", "format": "text", "path": "missing-b.txt"}]},
    }, "other.yaml")
    with pytest.raises(InvalidResourcesError) as raised:
        LocalRunner(tmp_path / "workspace", tmp_path).check([corpus, other])
    assert [error.resource for error in raised.value.errors] == [
        "Corpus/default/c", "Corpus/default/d"]
    assert "missing-a.txt" in str(raised.value)
    assert "missing-b.txt" in str(raised.value)


def test_resume_points_find_finetune_checkpoints(tmp_path):
    """The state.json that a FineTune checkpoint writes beside state.pt marks it complete."""
    import torch
    from lathe.local.runner import _resume_points
    from lathe_trainer.finetune import checkpoint
    from lathe_trainer.training import storage

    checkpoint.save(tmp_path / "checkpoints" / "lora", 30, {"weights": torch.zeros(2)}, keep=2)
    assert _resume_points(*storage.resolve(f"file://{tmp_path}")) == "lora step 30"


def test_silent_failure_names_full_disk(tmp_path, monkeypatch):
    """A stage that fails without a log line on a nearly full file system is reported as out
    of space, because writing the log is what failed."""
    from lathe.local import runner

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runner.shutil, "disk_usage",
                        lambda path: usage._replace(free=4096))
    message = runner._silent_failure(tmp_path)
    assert f"the file system of {tmp_path} has only 4 KiB free" in message
    assert "--workspace" in message


def test_silent_failure_with_space(tmp_path):
    from lathe.local import runner

    message = runner._silent_failure(tmp_path)
    assert message.startswith("the stage exited without writing to its log")


def _pretrain_job(**training):
    from lathe.api import KINDS

    return KINDS["PretrainJob"].model_validate({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "lm"},
        "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                 "training": training},
    })


def _write_checkpoint(base, step: int) -> None:
    folder = base / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")


def test_continuation_reads_artifact_uri_checkpoints(tmp_path):
    """With spec.training.artifactUri set, the stage resumes from the checkpoints there, so the
    maxSteps check and the "resumes from" message read those, not the ones in the output."""
    from lathe.errors import InvalidResourceError
    from lathe.local.runner import _check_continuable, _checkpoint_base, _resume_points
    from lathe_trainer.training import storage

    output, artifacts = tmp_path / "output", tmp_path / "artifacts"
    _write_checkpoint(output, 20)
    moved = _pretrain_job(maxSteps=12, artifactUri=f"file://{artifacts}")
    # The new artifactUri has no checkpoints yet, so the run trains from step 0.
    _check_continuable(moved, f"file://{output}")
    described = _resume_points(*storage.resolve(_checkpoint_base(moved, f"file://{output}")))

    _write_checkpoint(artifacts, 30)
    with pytest.raises(InvalidResourceError) as raised:
        _check_continuable(_pretrain_job(maxSteps=25, artifactUri=f"file://{artifacts}"),
                           f"file://{tmp_path / 'empty-output'}")

    assert described == ""
    assert _checkpoint_base(_pretrain_job(), f"file://{output}") == f"file://{output}"
    assert "below the step of the latest checkpoint (30," in str(raised.value)
    assert str(artifacts / "checkpoints") in str(raised.value)


def test_storage_uri_under_file_rejected(tmp_path):
    """A file:// spec.storage.uri inside a path that is a file is rejected by the checks,
    with the field, instead of failing later as an OS error without the resource."""
    from lathe import loader
    from lathe.errors import InvalidResourceError
    from lathe.local.runner import LocalRunner

    (tmp_path / "notes.txt").write_text("one two three four five six\n")
    (tmp_path / "archive.tar").write_text("x")
    corpus = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "notes"},
        "spec": {"sources": [{"name": "notes", "format": "text", "path": "notes.txt"}],
                 "storage": {"uri": f"file://{tmp_path}/archive.tar/corpus"}},
    }, "corpus.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        LocalRunner(tmp_path / "workspace", tmp_path).check([corpus])

    assert raised.value.field == "spec.storage.uri"
    assert f"({tmp_path}/archive.tar is a file, not a folder)" in str(raised.value)


def _record_finished(workspace, body: dict) -> None:
    """Record `body` in the workspace as a stage whose last run succeeded."""
    import json

    directory = (workspace / "default" / body["kind"].lower() / body["metadata"]["name"])
    (directory / "output").mkdir(parents=True)
    digest = "sha256:" + "0" * 64
    (directory / "output" / "manifest.json").write_text(json.dumps({"digest": digest}))
    (directory / "status.json").write_text(json.dumps({
        "phase": "Succeeded",
        "artifact": {"uri": f"file://{directory / 'output'}", "digest": digest},
    }))
    (directory / "resource.json").write_text(json.dumps(body))


def test_deployment_checked_against_recorded_pretrain_job(tmp_path):
    """A ModelDeployment run on its own is compared with the FineTune and the PretrainJob that
    the workspace recorded, as it is when all three files are given."""
    from lathe import loader
    from lathe.errors import InvalidResourceError
    from lathe.local.runner import LocalRunner

    workspace = tmp_path / "workspace"
    _record_finished(workspace, {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "lm"},
        "spec": {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"},
                 "model": {"maxPositionEmbeddings": 256}},
    })
    _record_finished(workspace, {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ner"},
        "spec": {"baseModel": {"pretrainJobRef": {"name": "lm"}}, "maxLength": 64,
                 "data": {"train": "train.tsv", "test": "test.tsv"}},
    })
    (tmp_path / "test.tsv").write_text("Aspirin\tO\nlowers\tO\nfever\tB-Disease\n\n")
    deployment = loader.parse_resource({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "ner"},
        "spec": {"model": {"fineTuneRef": {"name": "ner"}},
                 "export": {"heldOutData": "test.tsv", "windowStride": 500,
                            "checkSequenceLengths": [3, 20]}},
    }, "deployment.yaml")
    with pytest.raises(InvalidResourceError) as raised:
        LocalRunner(workspace, tmp_path).check([deployment])

    assert raised.value.field == "spec.export.windowStride"
    assert "500 leaves no new text in a window of 64 tokens" in str(raised.value)


def test_lock_closes_serving_left_by_killed_run(tmp_path):
    """A ModelDeployment whose `lathe run --serve` was killed is still Ready with an endpoint
    in status.json, so the next holder of the workspace records that nothing serves it."""
    from lathe import status
    from lathe.local.runner import workspace_lock

    workspace = tmp_path / "workspace"
    directory = workspace / "default" / "modeldeployment" / "pubmed-ner"
    directory.mkdir(parents=True)
    conditions = status.set_condition([], "Exported", True, "JobSucceeded", generation=1)
    conditions = status.set_condition(conditions, "Ready", True, "ServerReady",
                                      "Triton serves the model at http://127.0.0.1:8000.", 1)
    (directory / "status.json").write_text(json.dumps({
        "observedGeneration": 1, "phase": "Ready", "conditions": conditions,
        "endpoint": "http://127.0.0.1:8000"}))
    untouched = workspace / "default" / "corpus" / "pubmed"
    untouched.mkdir(parents=True)
    done = {"observedGeneration": 1, "phase": "Succeeded",
            "conditions": status.set_condition([], "Succeeded", True, "JobSucceeded",
                                               generation=1)}
    (untouched / "status.json").write_text(json.dumps(done))

    with workspace_lock(workspace):
        pass

    written = json.loads((directory / "status.json").read_text())
    assert written["phase"] == "Pending", written
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServerNotReady"), ready
    assert "lathe run --serve" in ready["message"]
    assert "endpoint" not in written
    assert json.loads((untouched / "status.json").read_text()) == done


@pytest.mark.parametrize("text", ["{\"conditions\": [", "{\"conditions\": [\"Running\"]}",
                                  "{\"conditions\": [{\"type\": \"Ready\"}]}"])
def test_lock_skips_malformed_status(tmp_path, caplog, text):
    """A status.json that is cut short or contains malformed conditions is left as it is and
    logged, and the run goes on to close the killed stages next to it."""
    from lathe import status
    from lathe.local.runner import workspace_lock

    workspace = tmp_path / "workspace"
    broken = workspace / "default" / "tokenizer" / "pubmed"
    broken.mkdir(parents=True)
    (broken / "status.json").write_text(text)
    killed = workspace / "default" / "corpus" / "pubmed"
    killed.mkdir(parents=True)
    running = status.set_condition([], "Running", True, "JobRunning", generation=1)
    (killed / "status.json").write_text(json.dumps(
        {"observedGeneration": 1, "phase": "Running", "conditions": running}))

    with caplog.at_level(logging.WARNING), workspace_lock(workspace):
        pass

    assert (broken / "status.json").read_text() == text
    assert f"Skipped {broken / 'status.json'}" in caplog.text
    closed = json.loads((killed / "status.json").read_text())
    condition = next(c for c in closed["conditions"] if c["type"] == "Running")
    assert (condition["status"], condition["reason"]) == ("False", "Interrupted"), condition
    assert not list(killed.glob(".*.partial"))


# A stand-in stage that writes a token file into its scratch folder, as a PretrainJob does.
# With two shards it fails, leaving the file, as an interrupted or failed run does; with one
# it writes its output and succeeds.
SCRATCH_STAGE = """
import sys
from pathlib import Path
from lathe_trainer import remote
from lathe_trainer.stage import StageConfig, local_path, write_manifest
config = StageConfig.model_validate_json(Path(sys.argv[1]).read_text())
(remote.scratch_dir(config) / "tokens").write_bytes(b"\\0" * 4096)
if config.spec["shards"] == 2:
    sys.exit(1)
(local_path(config.output_uri) / "shard.txt").write_text("text")
write_manifest(config, {})
"""


def test_restore_removes_other_runs_scratch(tmp_path, monkeypatch):
    """A run that restores previous-output/ removes the scratch folder of the failed run of
    another spec, which no later run reads: a run of that spec again starts over."""
    from lathe import loader
    from lathe.errors import StageFailedError
    from lathe.local.runner import LocalRunner

    monkeypatch.setattr(LocalRunner, "command", lambda self, plan, config, resume: [
        sys.executable, "-c", SCRATCH_STAGE, str(config)])
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("Aspirin lowers fever.\n")

    def corpus(shards: int):
        return loader.parse_resource({
            "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "notes"},
            "spec": {"sources": [{"name": "notes", "format": "text", "path": "notes.txt"}],
                     "shards": shards},
        }, "corpus.yaml")

    runner = LocalRunner(tmp_path / "workspace", data)
    scratch = runner.stage_dir(corpus(1)) / "scratch"
    runner.run([corpus(1)])
    finished_scratch = {path.name for path in scratch.iterdir()}
    with pytest.raises(StageFailedError):
        runner.run([corpus(2)])
    failed = {path.name for path in scratch.iterdir()} - finished_scratch
    assert len(failed) == 1
    assert (scratch / failed.pop() / "tokens").is_file()

    result = runner.run([corpus(1)])["Corpus/default/notes"]

    assert result.reused
    remaining = {path.name for path in scratch.iterdir()} if scratch.exists() else set()
    # Only the folder of the restored output's own stage key may stay, for a rerun of it.
    assert remaining <= finished_scratch
