"""The `lathe` command line's exit codes and its progress output when it is not a terminal."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from lathe import cli
from lathe.local.runner import ProgressEvent


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_exit_code_follows_the_signal(monkeypatch, capsys, signum, code):
    """`kill` gives 143 and a closed terminal 129, as a shell reports them, not Ctrl-C's 130."""

    def handler(_args, _console):
        cli._interrupt(signum, None)

    monkeypatch.setattr(cli, "_validate", handler)
    assert cli.main(["validate", "-f", "unused.yaml"]) == code
    assert "Interrupted" in capsys.readouterr().out


def test_ctrl_c_exit_code_is_130():
    """A real SIGINT in a child process: Python raises KeyboardInterrupt with no signal name."""
    script = textwrap.dedent("""
        import os, signal, sys
        from lathe import cli
        # A shell that starts a job in the background (`&`) ignores SIGINT in it, and Python
        # then installs no handler of its own, so the test restores Python's.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def handler(_args, _console):
            os.kill(os.getpid(), signal.SIGINT)
        cli._validate = handler
        sys.exit(cli.main(["validate", "-f", "unused.yaml"]))
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 130, completed.stderr


def _resources():
    def resource(kind: str, name: str):
        return SimpleNamespace(key=f"{kind}/default/{name}", kind=kind,
                               metadata=SimpleNamespace(name=name))
    return [resource("Corpus", "pubmed"), resource("PretrainJob", "pubmed-lm")]


def test_progress_lines_when_output_is_not_a_terminal():
    """Piped to a file, every stage's start and end is a line, and progress is rate-limited."""
    output = io.StringIO()
    console = Console(file=output, force_terminal=False, soft_wrap=True, highlight=False)
    assert not console.is_terminal
    now = [100.0]
    lines = cli.StageLines(console, _resources(), interval_s=30, clock=lambda: now[0])
    corpus, pretrain = (resource.key for resource in _resources())

    lines(ProgressEvent(corpus, "reused", message="reused"))
    lines(ProgressEvent(pretrain, "started"))
    for step in range(1, 11):
        now[0] += 10
        lines(ProgressEvent(pretrain, "progress", completed=step, total=10,
                            record={"message": f"step {step}", "loss": 5.0 - step / 10}))
    lines(ProgressEvent(pretrain, "succeeded", message="done"))

    printed = output.getvalue().splitlines()
    assert printed[0] == "Corpus pubmed: reused the finished output of an earlier run."
    assert printed[1] == "PretrainJob pubmed-lm: started."
    # 100 s of progress every 10 s, shown at most every 30 s: at 30, 60 and 90 s.
    progress = printed[2:-1]
    assert progress == [
        "PretrainJob pubmed-lm: 30%, step 3  loss 4.700",
        "PretrainJob pubmed-lm: 60%, step 6  loss 4.400",
        "PretrainJob pubmed-lm: 90%, step 9  loss 4.100",
    ]
    assert printed[-1] == "PretrainJob pubmed-lm: succeeded in 100.0 s."


def test_summary_headline_per_kind():
    """The summary shows each stage's main figure next to its artifact."""
    assert cli.headline("Corpus", {"documentsOut": 3190}) == "documents 3190"
    assert (cli.headline("FineTune", {"f1": 0.46416, "fromScratch": {"f1": 0.50361}})
            == "entity F1 0.4642, from scratch 0.5036")
    assert cli.headline("PretrainJob", {"validationPerplexity": None}) == ""
    assert (cli.headline("ModelDeployment", {"maxAbsDiff": 3.8e-06, "quantization": "deployed"})
            == "ONNX max abs diff 3.8e-06, serving INT8")
    assert (cli.headline("ModelDeployment", {"maxAbsDiff": 3.8e-06, "quantization": "rejected"})
            == "ONNX max abs diff 3.8e-06")
    assert cli.headline("Unknown", {"f1": 1.0}) == ""


@pytest.mark.parametrize("argv, verbose", [
    (["validate", "-f", "x.yaml", "-v"], True),
    (["-v", "validate", "-f", "x.yaml"], True),
    (["validate", "-f", "x.yaml"], False),
])
def test_verbose_before_or_after_command(argv, verbose):
    assert cli.parser().parse_args(argv).verbose is verbose


def test_other_checkout_warned(tmp_path):
    """A shared environment's `lathe` that runs another checkout's code prints a warning."""
    other = tmp_path / "other"
    (other / "operator" / "lathe").mkdir(parents=True)
    (other / "pyproject.toml").write_text("")
    (other / "examples").mkdir()
    warning = cli.other_checkout_warning(other / "examples")
    assert warning is not None
    assert f"the current directory ({other})" in warning
    assert f"run `make env` in {other}" in warning


def test_own_checkout_not_warned(tmp_path):
    repo = Path(cli.__file__).resolve().parents[2]
    assert cli.other_checkout_warning(repo / "examples") is None
    assert cli.other_checkout_warning(tmp_path) is None


def test_resumed_stage_says_so():
    """A stage that resumes from its checkpoints names the step when it starts."""
    output = io.StringIO()
    console = Console(file=output, force_terminal=False, width=200)
    resource = SimpleNamespace(key="PretrainJob/default/lm", kind="PretrainJob",
                               metadata=SimpleNamespace(name="lm"))
    lines = cli.StageLines(console, [resource])
    lines(ProgressEvent(resource.key, "started", message="resumes from the checkpoint of step 4"))
    assert output.getvalue() == "PretrainJob lm: started; resumes from the checkpoint of step 4.\n"


def test_triton_start_failure_is_an_error(monkeypatch, tmp_path, capsys):
    """A tritonserver that does not start ends lathe with an error line and status 1, and
    status.json records why Triton is not running."""
    from lathe.local import serving
    from lathe_trainer.serving import local_server

    def fail(*_args, **_kwargs):
        raise local_server.TritonStartError("tritonserver was not ready within 180 s")

    recorded = []
    monkeypatch.setattr(local_server, "start_triton", fail)
    monkeypatch.setattr(serving, "repository_path", lambda _result: tmp_path)
    monkeypatch.setattr(serving, "record_serving",
                        lambda _result, endpoint, message: recorded.append((endpoint, message)))
    result = SimpleNamespace(
        directory=tmp_path,
        resource=SimpleNamespace(key="ModelDeployment/default/ner",
                                 spec=SimpleNamespace(serving=None)),
    )
    monkeypatch.setattr(cli, "_validate",
                        lambda _args, console: serving.serve_and_query(result, "x", console))
    assert cli.main(["validate", "-f", "unused.yaml"]) == 1
    error = capsys.readouterr().err
    assert "error: ModelDeployment/default/ner: the local tritonserver did not start" in error
    assert "Traceback" not in error
    assert recorded == [(None, "Triton did not start: tritonserver was not ready within 180 s")]


def test_validate_rejects_storage_over_other_files(tmp_path, capsys):
    """`lathe validate` rejects a storage.uri with files a run would delete, as `lathe run` does."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("Aspirin lowers fever.\n")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep-me.txt").write_text("x\n")
    manifest = tmp_path / "corpus.yaml"
    manifest.write_text(textwrap.dedent(f"""
        apiVersion: lathe.dev/v1alpha1
        kind: Corpus
        metadata: {{name: notes}}
        spec:
          sources: [{{name: notes, format: text, path: notes.txt}}]
          storage: {{uri: "file://{occupied}"}}
    """))
    code = cli.main(["validate", "-f", str(manifest), "--data-dir", str(data),
                     "--workspace", str(tmp_path / "workspace")])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 1
    assert "spec.storage.uri" in output
    assert "keep-me.txt" in output
    assert (occupied / "keep-me.txt").is_file()


def test_validate_lists_unchecked_s3_paths(tmp_path, capsys):
    """An s3:// source passes validate, which reads no object store, and the output states
    that the path was not checked."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("Aspirin lowers fever.\n")
    manifest = tmp_path / "corpus.yaml"
    manifest.write_text(textwrap.dedent("""
        apiVersion: lathe.dev/v1alpha1
        kind: Corpus
        metadata: {name: notes}
        spec:
          sources:
            - {name: notes, format: text, path: notes.txt}
            - {name: remote, format: text, path: "s3://lathe-data/notes.txt"}
    """))
    code = cli.main(["validate", "-f", str(manifest), "--data-dir", str(data),
                     "--workspace", str(tmp_path / "workspace")])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "1 resource is valid." in output
    assert "Not checked: Corpus notes spec.sources[1].path 's3://lathe-data/notes.txt'" in output
    assert "notes.txt'" not in output.replace("s3://lathe-data/notes.txt'", "")


class FakeTriton:
    """A started tritonserver stand-in that records when it is stopped.

    The stand-in checks the order of starts and stops only. tests/serving/test_serve_many.py
    serves two deployments with real tritonservers.
    """

    def __init__(self, port: int, events: list[str]):
        self.http_port, self.grpc_port, self.metrics_port = port, port + 1, port + 2
        self.http_url = f"127.0.0.1:{port}"
        self.grpc_url = f"127.0.0.1:{port + 1}"
        self.metrics_url = f"http://127.0.0.1:{port + 2}/metrics"
        self.process = SimpleNamespace(poll=lambda: None)
        self.events = events

    def __enter__(self):
        self.events.append(f"start {self.http_port}")
        return self

    def __exit__(self, *_exc_info):
        self.events.append(f"stop {self.http_port}")


def _two_deployments(tmp_path):
    """Return the results of two exported ModelDeployments with the default serving ports."""
    spec = SimpleNamespace(serving=SimpleNamespace(http_port=8000, grpc_port=8001,
                                                   metrics_port=8002))
    return [
        SimpleNamespace(directory=tmp_path / name, resource=SimpleNamespace(
            key=f"ModelDeployment/default/{name}",
            spec=SimpleNamespace(**vars(spec), model_name=name)))
        for name in ("ner", "ner_fp32")
    ]


def _fake_servers(tmp_path, monkeypatch) -> list[str]:
    """Make serve_all start FakeTritons on ports 8000 and 8100 that need no model, and return
    the list that they record their starts and stops in."""
    from lathe.local import serving
    from lathe_trainer.serving import client, local_server

    events: list[str] = []
    ports = iter((8000, 8100))
    monkeypatch.setattr(local_server, "busy_ports", lambda _ports: [])
    monkeypatch.setattr(local_server, "start_triton",
                        lambda *_args, **_kwargs: FakeTriton(next(ports), events))
    monkeypatch.setattr(serving, "repository_path", lambda _result: tmp_path)
    monkeypatch.setattr(serving, "record_serving", lambda *_args: None)
    monkeypatch.setattr(client, "infer_entities", lambda *_args: [[]])
    return events


def test_serve_keeps_every_deployment_running(tmp_path, monkeypatch):
    """With --serve, every ModelDeployment of the run serves at once, and one Ctrl-C stops all
    of them, instead of the next one starting after the first is stopped."""
    from lathe.local import serving

    events = _fake_servers(tmp_path, monkeypatch)

    def interrupt(_seconds):
        events.append("interrupt")
        raise KeyboardInterrupt

    monkeypatch.setattr(serving.time, "sleep", interrupt)
    results = _two_deployments(tmp_path)
    output = io.StringIO()
    serving.serve_all(results, "x", Console(file=output, width=200), keep_serving=True)

    assert events == ["start 8000", "start 8100", "interrupt", "stop 8100", "stop 8000"]
    assert "serving model 'ner' at http://127.0.0.1:8000" in output.getvalue()
    assert "serving model 'ner_fp32' at http://127.0.0.1:8100" in output.getvalue()
    assert output.getvalue().count("Serving until interrupted") == 1


def test_serve_interrupt_during_serving_message(tmp_path, monkeypatch):
    """A Ctrl-C that arrives while --serve prints "Serving until interrupted" ends the serving
    normally, as that message promises: status 0 and every server stopped, not status 130."""
    from lathe.local import serving

    events = _fake_servers(tmp_path, monkeypatch)
    monkeypatch.setattr(serving.time, "sleep",
                        lambda _seconds: pytest.fail("serving went on after the interrupt"))

    class InterruptedConsole(Console):
        def print(self, *args, **kwargs) -> None:
            super().print(*args, **kwargs)
            if args and str(args[0]).startswith("Serving until interrupted"):
                events.append("interrupt")
                raise KeyboardInterrupt

    output = io.StringIO()
    try:
        serving.serve_all(_two_deployments(tmp_path), "x",
                          InterruptedConsole(file=output, width=200), keep_serving=True)
    except KeyboardInterrupt:
        pytest.fail("the interrupt left serve_all, so lathe run exits with 130, not 0")

    assert events == ["start 8000", "start 8100", "interrupt", "stop 8100", "stop 8000"]
    assert "Stopping Triton." in output.getvalue()


def test_serve_closed_output_not_status_zero(tmp_path, monkeypatch):
    """A standard output closed while --serve prints "Serving until interrupted" (`lathe run
    --serve | head`) stops every server and leaves serve_all as the broken pipe, so that lathe
    exits with 141 rather than the status 0 of a Ctrl-C."""
    import signal

    from lathe.local import serving

    events = _fake_servers(tmp_path, monkeypatch)
    monkeypatch.setattr(serving.time, "sleep",
                        lambda _seconds: pytest.fail("serving went on after the closed output"))

    class ClosedConsole(Console):
        def print(self, *args, **kwargs) -> None:
            if args and str(args[0]).startswith("Serving until interrupted"):
                events.append("closed")
                raise KeyboardInterrupt(signal.Signals.SIGPIPE.name)
            super().print(*args, **kwargs)

    output = io.StringIO()
    with pytest.raises(KeyboardInterrupt, match="SIGPIPE"):
        serving.serve_all(_two_deployments(tmp_path), "x",
                          ClosedConsole(file=output, width=200), keep_serving=True)

    assert events == ["start 8000", "start 8100", "closed", "stop 8100", "stop 8000"]
    assert "Stopping Triton." not in output.getvalue()


def test_serve_ctrl_c_after_closed_output(tmp_path, monkeypatch):
    """An output closed while Triton serves goes unnoticed until the next write. A Ctrl-C then
    still ends the serving normally, with status 0, though "Stopping Triton." cannot be
    written."""
    import signal

    from lathe.local import serving

    events = _fake_servers(tmp_path, monkeypatch)

    def interrupt(_seconds):
        events.append("interrupt")
        raise KeyboardInterrupt

    monkeypatch.setattr(serving.time, "sleep", interrupt)

    class ClosedLaterConsole(Console):
        def print(self, *args, **kwargs) -> None:
            if args and str(args[0]) == "Stopping Triton.":
                raise KeyboardInterrupt(signal.Signals.SIGPIPE.name)
            super().print(*args, **kwargs)

    serving.serve_all(_two_deployments(tmp_path), "x",
                      ClosedLaterConsole(file=io.StringIO(), width=200), keep_serving=True)
    assert events == ["start 8000", "start 8100", "interrupt", "stop 8100", "stop 8000"]


def test_serve_reports_crashed_deployment(tmp_path, monkeypatch):
    """When one of several served deployments' tritonserver exits, --serve fails with that
    deployment's error, records it in its status, and stops the other servers."""
    from lathe.local import serving
    from lathe_trainer.serving import client, local_server

    events: list[str] = []
    servers = [FakeTriton(8000, events), FakeTriton(8100, events)]
    servers[1].process = SimpleNamespace(poll=lambda: 1, returncode=1)
    servers[1].log_path = tmp_path / "tritonserver.log"
    servers[1].log_tail = lambda _lines: "signal 9"
    started = iter(servers)
    recorded = []
    monkeypatch.setattr(local_server, "busy_ports", lambda _ports: [])
    monkeypatch.setattr(local_server, "start_triton", lambda *_args, **_kwargs: next(started))
    monkeypatch.setattr(serving, "repository_path", lambda _result: tmp_path)
    monkeypatch.setattr(serving, "record_serving",
                        lambda result, endpoint, message="": recorded.append(
                            (result.resource.key, endpoint, message)))
    monkeypatch.setattr(client, "infer_entities", lambda *_args: [[]])
    results = _two_deployments(tmp_path)
    with pytest.raises(serving.ServingStoppedError) as raised:
        serving.serve_all(results, "x", Console(file=io.StringIO()), keep_serving=True)

    assert raised.value.resource == "ModelDeployment/default/ner_fp32"
    assert "tritonserver exited with code 1 while serving" in str(raised.value)
    assert recorded[-2][:2] == ("ModelDeployment/default/ner_fp32", None)
    assert recorded[-2][2].startswith("Triton stopped while serving: ")
    assert recorded[-1] == ("ModelDeployment/default/ner", None, "")
    assert events == ["start 8000", "start 8100", "stop 8100", "stop 8000"]


def test_summary_notes_what_the_figures_hide():
    """Malformed records, an empty validation split, a vocabulary shortfall and a missing
    perplexity reach the run summary, not only the stage logs."""
    from lathe import loader

    def resource(kind, spec):
        return loader.parse_resource({"apiVersion": "lathe.dev/v1alpha1", "kind": kind,
                                      "metadata": {"name": "x"}, "spec": spec}, "test")

    corpus = resource("Corpus", {"sources": [{"name": "a", "format": "text", "path": "a.txt"}]})
    tokenizer = resource("Tokenizer", {"corpusRef": {"name": "x"}, "vocabSize": 8000})
    assert cli.notes(corpus, {"malformed": 0, "validationDocuments": 10}) == []
    found = cli.notes(corpus, {"malformed": 3, "validationDocuments": 0})
    assert found[0].startswith("3 malformed records were counted")
    assert "spec.split.validationFraction" in found[1]
    # A full budget: protected terms that BPE had learned already are not added again, so the
    # final vocabulary can be smaller than vocabSize without any shortfall.
    assert cli.notes(tokenizer, {"vocabSize": 7986, "vocabShortfall": 0}) == []
    assert cli.notes(tokenizer, {"vocabSize": 7000, "vocabShortfall": 986}) == [
        "BPE learned 986 tokens fewer than spec.vocabSize leaves after the protected terms, "
        "because the training split has no more pairs to merge; lower vocabSize or add "
        "training text."]
    pretrain = resource("PretrainJob", {"corpusRef": {"name": "x"}, "tokenizerRef": {"name": "x"}})
    assert cli.notes(pretrain, {"validationPerplexity": 152.2}) == []
    assert "fills no sequence" in cli.notes(
        pretrain, {"validationPerplexity": None, "validationSequences": 0})[0]
    assert "not finite" in cli.notes(
        pretrain, {"validationPerplexity": None, "validationSequences": 395})[0]



# A stand-in stage for `lathe run`: it records its pid, waits until the test has closed lathe's
# standard output, then writes one progress record and runs until it is stopped.
WAITING_STAGE = """
import json, os, sys, time
from pathlib import Path
config = json.loads(Path(sys.argv[1]).read_text())
Path(sys.argv[2]).write_text(str(os.getpid()))
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
output = Path(config["outputUri"].removeprefix("file://"))
with (output / "progress.jsonl").open("a") as progress:
    progress.write(json.dumps({"completed": 1, "total": 2, "message": "step 1"}) + "\\n")
time.sleep(600)
"""

# `lathe run` with WAITING_STAGE in place of the real stage, printing every progress record
# (interval 0), so that its next line after "started" goes into the closed pipe.
LATHE_WITH_WAITING_STAGE = """
import sys
from lathe import cli
from lathe.local.runner import LocalRunner

stage, pid_file, closed_flag = sys.argv[1:4]
LocalRunner.command = lambda self, plan, config, resume: [
    sys.executable, stage, str(config), pid_file, closed_flag]


class EveryLine(cli.StageLines):
    def __init__(self, console, resources):
        super().__init__(console, resources, interval_s=0.0)


cli.StageLines = EveryLine
sys.exit(cli.main(sys.argv[4:]))
"""


def test_closed_stdout_interrupts_run(tmp_path):
    """`lathe run | head -1`: once stdout is closed, lathe stops the running stage, records it
    as Interrupted, and exits with 141 (128 + SIGPIPE) and one line on stderr."""
    import json
    import os
    import time

    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("Aspirin lowers fever.\n")
    manifest = tmp_path / "corpus.yaml"
    manifest.write_text(textwrap.dedent("""
        apiVersion: lathe.dev/v1alpha1
        kind: Corpus
        metadata: {name: notes}
        spec:
          sources: [{name: notes, format: text, path: notes.txt}]
    """))
    stage = tmp_path / "stage.py"
    stage.write_text(WAITING_STAGE)
    pid_file, closed_flag = tmp_path / "stage.pid", tmp_path / "closed"
    workspace = tmp_path / "workspace"
    lathe = subprocess.Popen(
        [sys.executable, "-c", LATHE_WITH_WAITING_STAGE, str(stage), str(pid_file),
         str(closed_flag), "run", "-f", str(manifest), "--data-dir", str(data),
         "--workspace", str(workspace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = lathe.stdout.readline()
        # What `head -1` does: read one line and close the pipe.
        lathe.stdout.close()
        closed_flag.touch()
        code = lathe.wait(timeout=60)
    finally:
        if lathe.poll() is None:
            lathe.kill()
            lathe.wait()
    stderr = lathe.stderr.read()
    lathe.stderr.close()

    assert first == "Corpus notes: started.\n"
    assert code == 141, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert "standard output was closed" in stderr
    written = json.loads((workspace / "default" / "corpus" / "notes" / "status.json").read_text())
    running = next(c for c in written["conditions"] if c["type"] == "Running")
    assert running["status"] == "False"
    assert running["reason"] == "Interrupted"
    assert written["phase"] != "Running"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = not Path(f"/proc/{pid}").exists()
    if not stopped:
        os.kill(pid, 9)
    assert stopped
