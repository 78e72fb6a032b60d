"""`lathe run` on the PubMed example: every stage, real data, a real Triton, CI-sized settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lathe import loader
from lathe.api import ModelDeployment
from lathe.errors import InvalidResourceError, StageFailedError
from lathe.local import serving
from lathe.local.runner import LocalRunner
from rich.console import Console

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "pubmed"

# Settings that keep the whole pipeline to a few minutes on two cores. Everything else is the
# example as users run it.
CI_OVERRIDES = {
    # Two workers, as two pods of the Corpus Job would share the work.
    "Corpus": {"workers": 2},
    "PretrainJob": {"training": {"maxSteps": 30, "checkpointInterval": 15, "evalInterval": 15}},
    # 60 steps at the example's learning rate reached test F1 0.33 to 0.42 over four seeds
    # on the 30-step base. At 40 steps F1 ranged from 0 to 0.32 with the seed and with small
    # changes of the tokenizer, too close to what a model that learned nothing scores.
    "FineTune": {"training": {"maxSteps": 60},
                 "maxTrainSentences": 1500, "maxEvalSentences": 300},
}


def _merge(target: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


@pytest.fixture(scope="module")
def ci_examples(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    for path in sorted(EXAMPLES.glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for document in documents:
            _merge(document["spec"], CI_OVERRIDES.get(document["kind"], {}))
        (folder / path.name).write_text(yaml.safe_dump_all(documents))
    return folder


@pytest.fixture(scope="module")
def pipeline(ci_examples, tmp_path_factory, data_dir):
    workspace = tmp_path_factory.mktemp("workspace")
    runner = LocalRunner(workspace, data_dir)
    resources = runner.check(loader.load_paths([ci_examples]))
    return runner, resources, runner.run(resources)


def test_stages_run_in_dependency_order(pipeline):
    _, _, results = pipeline
    kinds = [result.resource.kind for result in results.values()]
    assert kinds == ["Corpus", "Tokenizer", "PretrainJob", "FineTune", "ModelDeployment"]
    for result in results.values():
        assert result.manifest["digest"].startswith("sha256:")
        assert not result.reused


def test_manifests_chain_inputs_by_digest(pipeline):
    _, _, results = pipeline
    by_kind = {result.resource.kind: result for result in results.values()}
    tokenizer_inputs = by_kind["Tokenizer"].manifest["inputs"]
    assert tokenizer_inputs["corpus"]["digest"] == by_kind["Corpus"].manifest["digest"]
    finetune_inputs = by_kind["FineTune"].manifest["inputs"]
    assert finetune_inputs["baseModel"]["digest"] == by_kind["PretrainJob"].manifest["digest"]


def test_corpus_counts_add_up(pipeline):
    _, _, results = pipeline
    corpus = next(r for r in results.values() if r.resource.kind == "Corpus")
    metrics = corpus.manifest["metrics"]
    assert metrics["documentsOut"] == metrics["trainDocuments"] + metrics["validationDocuments"]
    assert metrics["documentsOut"] > 1000


def test_pretraining_loss_falls(pipeline):
    _, _, results = pipeline
    pretrain = next(r for r in results.values() if r.resource.kind == "PretrainJob")
    metrics = pretrain.manifest["metrics"]
    assert metrics["finalLoss"] < metrics["firstLoss"]


def test_finetune_beats_learned_nothing(pipeline):
    _, _, results = pipeline
    finetune = next(r for r in results.values() if r.resource.kind == "FineTune")
    # A model that learned nothing predicts O everywhere, which scores an entity F1 of 0.
    assert finetune.manifest["metrics"]["f1"] > 0.1


def test_triton_answers_like_in_process_model(pipeline):
    _, _, results = pipeline
    deployment = next(r for r in results.values() if isinstance(r.resource, ModelDeployment))
    sample = "Mutations in the BRCA1 gene cause hereditary breast and ovarian cancer."
    answer = serving.serve_and_query(deployment, sample, Console(quiet=True), keep_serving=False)
    expected = serving.in_process_answer(deployment, sample)
    assert answer == expected


def test_deployment_status_follows_triton(pipeline):
    """status.json of a ModelDeployment shows Exported after the stage, Ready with the endpoint
    while Triton serves, and Ready False once Triton has stopped."""
    _, _, results = pipeline
    deployment = next(r for r in results.values() if isinstance(r.resource, ModelDeployment))
    path = deployment.directory / "status.json"
    seen: list[dict] = []

    class Recording(Console):
        def print(self, *args, **kwargs) -> None:
            seen.append(json.loads(path.read_text()))
            super().print(*args, **kwargs)

    serving.serve_and_query(deployment, "BRCA1 mutations cause breast cancer.",
                            Recording(quiet=True), keep_serving=False)
    during, after = seen[0], json.loads(path.read_text())
    conditions = {c["type"]: c for c in during["conditions"]}
    assert conditions["Exported"]["status"] == "True"
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "ServerReady"
    assert during["phase"] == "Ready"
    assert during["endpoint"].startswith("http://127.0.0.1:")
    conditions = {c["type"]: c for c in after["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ServerNotReady"
    assert "endpoint" not in after


def test_triton_crash_while_serving_reported(pipeline):
    """With --serve, a tritonserver that exits on its own fails lathe run and its status."""
    import psutil

    _, _, results = pipeline
    deployment = next(r for r in results.values() if isinstance(r.resource, ModelDeployment))

    class Crashing(Console):
        def print(self, *args, **kwargs) -> None:
            if args and str(args[0]).startswith("Serving until interrupted"):
                for child in psutil.Process().children(recursive=True):
                    if "tritonserver" in child.name():
                        child.kill()
            super().print(*args, **kwargs)

    with pytest.raises(serving.ServingStoppedError, match="tritonserver exited with code"):
        serving.serve_and_query(deployment, "BRCA1 mutations cause breast cancer.",
                                Crashing(quiet=True), keep_serving=True)
    written = json.loads((deployment.directory / "status.json").read_text())
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["message"].startswith("Triton stopped while serving")


def test_second_run_reuses_every_stage(pipeline):
    runner, resources, _ = pipeline
    again = runner.run(resources)
    assert all(result.reused for result in again.values())


def test_suspended_stage_is_not_run(pipeline):
    """A PretrainJob with `suspend: true` is not started, and the stages after it wait, as in
    a cluster. A suspended stage whose output is finished is still reused."""
    runner, resources, _ = pipeline

    def suspended(extra_steps: int) -> list:
        copies = []
        for resource in resources:
            copy = resource.model_copy(deep=True)
            if copy.kind == "PretrainJob":
                copy.spec.suspend = True
                copy.spec.training.max_steps += extra_steps
            copies.append(copy)
        return copies

    finished = runner.run(suspended(0))
    assert all(result.reused for result in finished.values())
    assert len(finished) == len(resources)
    assert runner.not_run == {}

    changed = runner.run(suspended(1))
    assert [result.resource.kind for result in changed.values()] == ["Corpus", "Tokenizer"]
    not_run = {key.split("/")[0]: reason for key, reason in runner.not_run.items()}
    assert set(not_run) == {"PretrainJob", "FineTune", "ModelDeployment"}
    assert "spec.suspend" in not_run["PretrainJob"]
    assert "PretrainJob pubmed-lm" in not_run["FineTune"]
    written = {path.parts[-3]: json.loads(path.read_text())
               for path in runner.workspace.glob("*/*/*/status.json")}
    assert written["pretrainjob"]["phase"] == "Suspended"
    assert written["finetune"]["phase"] == "Waiting"
    waiting = next(c for c in written["modeldeployment"]["conditions"]
                   if c["type"] == "InputsReady")
    assert waiting["status"] == "False"
    assert "FineTune pubmed-ner" in waiting["message"]


def test_lower_max_steps_keeps_output(pipeline, tmp_path, data_dir):
    """Lowering maxSteps below the latest checkpoint of a continued PretrainJob is rejected
    before anything is deleted, and the finished output stays."""
    runner, resources, _ = pipeline
    workspace = tmp_path / "workspace"
    # The Corpus and Tokenizer come from the pipeline's workspace, as references to stages
    # that finished there.
    for kind in ("corpus", "tokenizer"):
        shutil.copytree(runner.workspace / "default" / kind, workspace / "default" / kind)
    job = next(r for r in resources if r.kind == "PretrainJob").model_copy(deep=True)
    job.spec.training.max_steps = 4
    job.spec.training.checkpoint_interval = 2
    job.spec.training.eval_interval = 2
    job.spec.training.warmup_steps = 1
    longer = job.model_copy(deep=True)
    longer.spec.training.max_steps = 6
    own = LocalRunner(workspace, data_dir)
    own.run(own.check([job]))
    events = []
    own.on_progress = events.append
    continued = own.run(own.check([longer]))[job.key]
    started = next(event for event in events if event.state == "started")
    assert started.message == "resumes from the checkpoint of step 4"

    with pytest.raises(InvalidResourceError) as raised:
        own.run(own.check([job]))
    message = str(raised.value)
    assert "spec.training.maxSteps" in message
    assert "4 is below the step of the latest checkpoint (6," in message
    assert "The finished output was left as it is." in message
    manifest = json.loads((continued.directory / "output" / "manifest.json").read_text())
    assert manifest["digest"] == continued.manifest["digest"]


def test_cli_rejects_unknown_field_with_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "x"},
        "spec": {"sources": [], "shardz": 2},
    }))
    completed = subprocess.run(
        [sys.executable, "-m", "lathe.cli", "validate", "-f", str(bad)],
        capture_output=True, text=True,
    )
    assert completed.returncode == 1
    assert "spec" in completed.stderr
    assert "Corpus/default/x (in " in completed.stderr
    assert completed.stdout == ""


def test_changed_data_file_reruns_stage(tmp_path, data_dir):
    """A data file edited in place changes the stage key, so the stage runs again instead of
    reusing the output of the old file. An unchanged file is still reused."""
    source = "pubmed/ncbi-disease/corpus/NCBIdevelopset_corpus.txt"
    copy = tmp_path / "data" / source
    copy.parent.mkdir(parents=True)
    copy.write_bytes((data_dir / source).read_bytes())
    document = {
        "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "small"},
        "spec": {"sources": [{"name": "ncbi-dev", "format": "ncbiDisease", "path": source}]},
    }
    runner = LocalRunner(tmp_path / "workspace", tmp_path / "data")

    def run():
        resources = runner.check([loader.parse_resource(document, "test")])
        return runner.run(resources)["Corpus/default/small"]

    first = run()
    again = run()
    # Keep the first half of the documents: they are separated by blank lines.
    documents = copy.read_text().split("\n\n")
    copy.write_text("\n\n".join(documents[: len(documents) // 2]) + "\n")
    changed = run()

    assert not first.reused
    assert again.reused
    assert not changed.reused
    assert changed.manifest["digest"] != first.manifest["digest"]
    assert changed.manifest["metrics"]["documentsIn"] < first.manifest["metrics"]["documentsIn"]


def test_failed_stage_reports_this_run(tmp_path, data_dir):
    """A stage that rejects its input at run time fails with its own error line, once, from
    this run's log only, and status.json reports Failed."""
    runner = LocalRunner(tmp_path / "workspace", data_dir)

    def run_corpus(source: str) -> StageFailedError:
        # A minWords no abstract reaches removes every document, which the stage rejects.
        corpus = {
            "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "small"},
            "spec": {"sources": [{"name": "ncbi", "format": "ncbiDisease",
                                  "path": f"pubmed/ncbi-disease/corpus/{source}"}],
                     "minWords": 100000},
        }
        with pytest.raises(StageFailedError) as raised:
            runner.run(runner.check([loader.parse_resource(corpus, "test")]))
        return raised.value

    run_corpus("NCBIdevelopset_corpus.txt")  # 100 abstracts
    error = run_corpus("NCBItrainset_corpus.txt")  # 593 abstracts

    message = str(error)
    assert error.exit_code == 42
    assert "spec.minWords: no documents remain after filtering 593 records" in message
    assert "filtering 100 records" not in message
    assert "\nerror: " not in message
    assert ": error: " not in message
    assert message.count("Corpus") == 1
    status_file = next((tmp_path / "workspace").glob("*/corpus/small/status.json"))
    written = json.loads(status_file.read_text())
    assert written["phase"] == "Failed"
    failed = next(c for c in written["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "JobFailed"


def test_failed_spec_change_keeps_output(tmp_path, data_dir):
    """A changed spec that fails leaves the last finished output in previous-output/, the
    earlier spec restores it without running, and a changed spec that succeeds replaces it."""
    runner = LocalRunner(tmp_path / "workspace", data_dir)

    def corpus(min_words: int) -> list:
        document = {
            "apiVersion": "lathe.dev/v1alpha1", "kind": "Corpus", "metadata": {"name": "small"},
            "spec": {"sources": [{"name": "ncbi", "format": "ncbiDisease",
                                  "path": "pubmed/ncbi-disease/corpus/NCBIdevelopset_corpus.txt"}],
                     "minWords": min_words},
        }
        return runner.check([loader.parse_resource(document, "test")])

    first = runner.run(corpus(5))["Corpus/default/small"]
    previous = first.directory / "previous-output"

    # No abstract has 100000 words, so the stage fails.
    with pytest.raises(StageFailedError) as raised:
        runner.run(corpus(100000))
    assert f"kept in {previous}" in raised.value.detail
    assert json.loads((previous / "manifest.json").read_text())["digest"] == (
        first.manifest["digest"])
    written = json.loads((first.directory / "status.json").read_text())
    failed = next(c for c in written["conditions"] if c["type"] == "Failed")
    assert str(previous) in failed["message"]

    restored = runner.run(corpus(5))["Corpus/default/small"]
    assert restored.reused
    assert restored.manifest["digest"] == first.manifest["digest"]
    assert not previous.exists()
    # A run that references the Corpus without its file reads the restored spec.
    recorded = json.loads((first.directory / "resource.json").read_text())
    assert recorded["spec"]["minWords"] == 5
    shards = sorted(path.name for path in (first.directory / "output").rglob("*") if path.is_file())
    assert "manifest.json" in shards
    assert len(shards) > 2

    changed = runner.run(corpus(20))["Corpus/default/small"]
    assert not changed.reused
    assert changed.manifest["stageKey"] != first.manifest["stageKey"]
    assert not previous.exists()


def test_reference_resolved_from_workspace(tmp_path, data_dir, capsys):
    """A resource run without the file of a stage it references uses that stage's finished
    output in the workspace, as a cluster resolves a reference to an existing resource."""
    from lathe import cli

    workspace = tmp_path / "workspace"
    tokenizer_file = EXAMPLES / "02-tokenizer.yaml"
    runner = LocalRunner(workspace, data_dir)
    first = runner.run(runner.check(loader.load_paths([EXAMPLES / "01-corpus.yaml",
                                                       tokenizer_file])))
    corpus = first["Corpus/default/pubmed"]

    alone = runner.run(runner.check(loader.load_paths([tokenizer_file])))
    assert list(alone) == ["Tokenizer/default/pubmed"]
    assert alone["Tokenizer/default/pubmed"].reused
    found = runner.from_workspace["Corpus/default/pubmed"]
    assert found.resolved.digest == corpus.manifest["digest"]
    assert found.resource is not None and found.resource.spec == corpus.resource.spec

    # A changed spec runs, on the corpus from the workspace.
    changed = tmp_path / "tokenizer.yaml"
    document = yaml.safe_load(tokenizer_file.read_text())
    document["spec"]["vocabSize"] = 4000
    changed.write_text(yaml.safe_dump(document))
    code = cli.main(["run", "-f", str(changed), "--workspace", str(workspace),
                     "--data-dir", str(data_dir)])
    printed = capsys.readouterr().out
    assert code == 0
    assert (f"Corpus pubmed: not in the files given; using its finished output from the "
            f"workspace, artifact {corpus.manifest['digest'][:19]}") in printed
    assert "Tokenizer pubmed: ran in" in printed
    inputs = json.loads((workspace / "default/tokenizer/pubmed/output/manifest.json")
                        .read_text())["inputs"]
    assert inputs["corpus"]["digest"] == corpus.manifest["digest"]

    # Without a finished output, the reference is an error that names the workspace.
    other = LocalRunner(tmp_path / "empty", data_dir)
    with pytest.raises(InvalidResourceError) as raised:
        other.check(loader.load_paths([tokenizer_file]))
    assert "spec.corpusRef.name" in str(raised.value)
    assert f"no finished output in the workspace {tmp_path / 'empty'}" in str(raised.value)


def test_stale_workspace_input_rejected(tmp_path, data_dir):
    """A PretrainJob whose Corpus ran again is not trained with a Tokenizer from the workspace
    that was built from the Corpus's earlier output."""
    workspace = tmp_path / "workspace"
    runner = LocalRunner(workspace, data_dir)
    runner.run(runner.check(loader.load_paths([EXAMPLES / "01-corpus.yaml",
                                               EXAMPLES / "02-tokenizer.yaml"])))
    corpus = yaml.safe_load((EXAMPLES / "01-corpus.yaml").read_text())
    corpus["spec"]["minWords"] = 40
    changed = tmp_path / "corpus.yaml"
    changed.write_text(yaml.safe_dump(corpus))

    with pytest.raises(InvalidResourceError) as raised:
        runner.run(runner.check(loader.load_paths([changed, EXAMPLES / "03-pretrain.yaml"])))
    message = str(raised.value)
    assert "spec.tokenizerRef.name" in message
    assert "Tokenizer 'pubmed' was built from the output" in message
    assert "pass the Tokenizer's file too with -f" in message
    assert not (workspace / "default" / "pretrainjob" / "pubmed-lm" / "output").exists()


def test_torchrun_stage_error_is_permanent(tmp_path, data_dir):
    """A StageError in a two-process stage fails it on the first attempt, with the stage's
    own message and not torchrun's report of the failed workers."""
    finetune = next(doc for doc in yaml.safe_load_all((EXAMPLES / "04-finetune.yaml").read_text())
                    if doc)  # fmt: skip
    # A directory that passes the check before the run (it has a config.json) but contains no
    # model, so the stage itself rejects it.
    missing = tmp_path / "no-model"
    missing.mkdir()
    (missing / "config.json").write_text("{}")
    finetune["spec"]["baseModel"] = {"uri": f"file://{missing}"}
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    with pytest.raises(StageFailedError) as raised:
        runner.run(runner.check([loader.parse_resource(finetune, "test")]))

    message = str(raised.value)
    assert raised.value.exit_code == 42
    assert "spec.baseModel" in message
    assert str(missing) in message
    assert "ChildFailedError" not in message
    assert "Traceback" not in message
    stage_log = next((tmp_path / "workspace").glob("*/finetune/pubmed-ner/stage.log"))
    # One attempt: each of the two processes prints the error once.
    assert stage_log.read_text().count("error: ") == 2


def test_python_only_pattern_rejected_before_run(tmp_path, data_dir):
    """A protected pattern that Oniguruma rejects fails the check before any stage runs."""
    corpus = next(doc for doc in yaml.safe_load_all((EXAMPLES / "01-corpus.yaml").read_text())
                  if doc)  # fmt: skip
    tokenizer = next(doc for doc in yaml.safe_load_all((EXAMPLES / "02-tokenizer.yaml").read_text())
                     if doc)  # fmt: skip
    tokenizer["spec"]["protectedPatterns"][0]["regex"] = "(?P<code>[A-Z][0-9]+)"
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    with pytest.raises(InvalidResourceError) as raised:
        runner.check([loader.parse_resource(corpus, "corpus.yaml"),
                      loader.parse_resource(tokenizer, "tokenizer.yaml")])
    assert raised.value.field == "spec.protectedPatterns[0].regex"
    assert "Oniguruma" in raised.value.detail
    assert not (tmp_path / "workspace").exists()


def test_killed_run_is_not_left_running(tmp_path, data_dir):
    """SIGKILL gives `lathe run` no chance to record the end of its stage. The next run that
    takes the workspace closes the Running condition instead of trusting it."""
    import signal
    import time

    workspace = tmp_path / "workspace"
    lathe = subprocess.Popen(
        [sys.executable, "-m", "lathe.cli", "run", "-f", str(EXAMPLES / "01-corpus.yaml"),
         "--workspace", str(workspace), "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    status_file = workspace / "default" / "corpus" / "pubmed" / "status.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and lathe.poll() is None:
            if status_file.is_file() and json.loads(status_file.read_text())["phase"] == "Running":
                break
            time.sleep(0.1)
        assert json.loads(status_file.read_text())["phase"] == "Running"
        lathe.send_signal(signal.SIGKILL)
        lathe.wait(timeout=30)
    finally:
        if lathe.poll() is None:
            lathe.kill()
    assert json.loads(status_file.read_text())["phase"] == "Running"

    LocalRunner(workspace, data_dir).run([])

    written = json.loads(status_file.read_text())
    assert written["phase"] == "Pending", written
    running = next(c for c in written["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Interrupted"), running
    assert "stopped without recording its end" in running["message"]


def test_sigterm_stops_stage_processes(tmp_path, data_dir):
    """`kill` on `lathe run` stops the stage processes it started, as Ctrl-C does."""
    import signal
    import time

    import psutil

    # As under nohup: SIGHUP is ignored, and lathe must keep it so.
    lathe = subprocess.Popen(
        [sys.executable, "-m", "lathe.cli", "run", "-f", str(EXAMPLES),
         "--workspace", str(tmp_path / "workspace"), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    parent = psutil.Process(lathe.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not children and lathe.poll() is None and time.monotonic() < deadline:
            children = parent.children(recursive=True)
            time.sleep(0.2)
        assert children, "lathe run started no stage process"
        lathe.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert lathe.poll() is None, "lathe stopped on a SIGHUP that nohup ignores"
        lathe.send_signal(signal.SIGTERM)
        output, _ = lathe.communicate(timeout=60)
        # lathe waits for its stage processes before it exits, so none outlives it. A stage
        # left running would take seconds more to finish.
        _, alive = psutil.wait_procs(children, timeout=2)
        assert lathe.returncode == 128 + signal.SIGTERM, output
        assert "Interrupted" in output
        assert not alive, [process.cmdline() for process in alive]
        # The stage that was running records the interruption instead of Running.
        written = [json.loads(path.read_text())
                   for path in (tmp_path / "workspace").glob("*/*/*/status.json")]
        interrupted = [document for document in written
                       if any(c["reason"] == "Interrupted" for c in document["conditions"])]
        assert len(interrupted) == 1, written
        assert interrupted[0]["phase"] == "Pending"
        assert not any(document["phase"] == "Running" for document in written)
    finally:
        for process in children:
            if process.is_running():
                process.kill()
        if lathe.poll() is None:
            lathe.kill()
