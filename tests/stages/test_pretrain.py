"""The PretrainJob stage on real PubMed abstracts, under torchrun and as a plain process.

The Corpus and Tokenizer inputs are written here in their output formats (BC5CDR abstracts as
JSONL shards, a byte-level BPE trained on them), so these tests do not depend on those stages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lathe.api import KINDS
from lathe.errors import InvalidResourceError, StageFailedError
from lathe.local.runner import LocalRunner, StageResult
from lathe_trainer.pretrain import stage
from lathe_trainer.pretrain.data import DataPosition, SequenceSampler, pack_split
from lathe_trainer.stage import EXIT_PERMANENT, ResolvedInput, StageError
from lathe_trainer.training import checkpoint

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "03-pretrain.yaml"
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]
# The timeout only stops a hung collective from blocking the suite.
RUN_TIMEOUT_SECONDS = 600

pytestmark = pytest.mark.slow


def read_pubtator(path: Path) -> list[dict]:
    """Return the documents (title and abstract) of a PubTator file."""
    documents: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] in ("t", "a"):
            documents.setdefault(parts[0], []).append(parts[2])
    return [{"id": pmid, "source": path.name, "text": " ".join(text)}
            for pmid, text in documents.items()]


def write_corpus(root: Path, train: list[dict], validation: list[dict]) -> ResolvedInput:
    for split, documents in (("train", train), ("validation", validation)):
        (root / split).mkdir(parents=True)
        lines = "".join(json.dumps(document) + "\n" for document in documents)
        (root / split / "shard-00000.jsonl").write_text(lines, encoding="utf-8")
    return ResolvedInput(kind="Corpus", name="pubmed", uri=f"file://{root}", digest="sha256:c")


def write_tokenizer(root: Path, texts: list[str]) -> ResolvedInput:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.save_pretrained(str(root))
    return ResolvedInput(kind="Tokenizer", name="pubmed", uri=f"file://{root}", digest="sha256:t")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run in-process training on one thread, as torchrun does for each of its processes.

    Two threads oversubscribe a 2-core machine: on one shared with other jobs, the resume
    reproduction test took 32 s with two threads and 5 s with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir) -> dict[str, dict[str, ResolvedInput]]:
    """Two input sets: 300 abstracts, and 4 abstracts that one epoch of a few steps exhausts."""
    root = tmp_path_factory.mktemp("inputs")
    bc5cdr = data_dir / "pubmed" / "bc5cdr"
    train = read_pubtator(bc5cdr / "CDR_TrainingSet.PubTator.txt")[:300]
    validation = read_pubtator(bc5cdr / "CDR_DevelopmentSet.PubTator.txt")[:20]
    tokenizer = write_tokenizer(root / "tokenizer", [d["text"] for d in train])
    return {
        "full": {"corpus": write_corpus(root / "full", train, validation),
                 "tokenizer": tokenizer},
        "tiny": {"corpus": write_corpus(root / "tiny", train[:4], validation),
                 "tokenizer": tokenizer},
    }


def pretrain_resource(procs: int = 2, model: dict | None = None, **training) -> dict:
    # Warmup must end before the last step (a CEL rule), so very short runs get none.
    warmup = 2 if training.get("maxSteps", 200) > 2 else 0
    return {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "lm"},
        "spec": {
            "corpusRef": {"name": "pubmed"},
            "tokenizerRef": {"name": "pubmed"},
            "model": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                      "intermediateSize": 128, "maxPositionEmbeddings": 128, **(model or {})},
            "sequenceLength": 64,
            "evalSequences": 32,
            "training": {"microBatchSize": 4, "learningRate": 3e-3, "warmupSteps": warmup,
                         "checkpointInterval": 4, "evalInterval": 4, **training},
            "distributed": {"nodes": 1, "procsPerNode": procs},
        },
    }


def launch(config_path: Path, procs: int, resume: bool = False) -> subprocess.CompletedProcess:
    """Run the stage under torchrun, as the plans do."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(procs)]
    command += ["-m", "lathe_trainer", "pretrain", "--config", str(config_path)]
    command += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT_SECONDS)


def failure_excerpt(stderr: str) -> str:
    """Return the part of a failed torchrun's stderr that shows the cause.

    A worker that crashes in native code prints faulthandler's "Fatal Python error" and every
    thread's Python stack, then a list of extension modules that would fill a plain tail.
    """
    start = stderr.find("Fatal Python error")
    if start < 0:
        return stderr[-4000:]
    # What the worker printed just before, such as the C++ exception that ended it, and then
    # the stacks.
    start = max(0, start - 2000)
    return stderr[start:start + 8000] + "\n...\n" + stderr[-1500:]


def run_stage(make_config, tmp_path, resource, inputs, output, resume=False):
    """Run the stage for `resource` and return metrics.json.

    Two processes run under torchrun. One process runs inside the test process, which skips
    the start-up of a new interpreter and is the same code path as `python -m` without torchrun.
    """
    config = make_config(resource, inputs, output=output)
    procs = resource["spec"]["distributed"]["procsPerNode"]
    if procs == 1:
        stage.run(config, resume=resume)
    else:
        path = tmp_path / "config.json"
        path.write_text(config.model_dump_json())
        result = launch(path, procs, resume)
        assert result.returncode == 0, failure_excerpt(result.stderr)
    return json.loads((output / "metrics.json").read_text())


def progress(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]


def step_losses(output: Path) -> dict[int, float]:
    """{step: loss} from the step records of progress.jsonl, the latest record winning."""
    return {r["completed"]: r["loss"] for r in progress(output) if "gradNorm" in r}


def test_two_process_run_trains(make_config, tmp_path, inputs, monkeypatch):
    """torchrun with 2 gloo processes lowers the loss and writes a loadable HF model.

    The step losses also match one process with a micro-batch twice as large.
    """
    output = tmp_path / "out"
    monkeypatch.setenv("LATHE_SCRATCH_DIR", str(tmp_path / "scratch"))
    metrics = run_stage(make_config, tmp_path, pretrain_resource(maxSteps=16, keepCheckpoints=2),
                        inputs["full"], output)
    # The processes tokenized the corpus into a scratch directory under LATHE_SCRATCH_DIR,
    # which the stage removed with the token files when it succeeded.
    assert (tmp_path / "scratch").is_dir()
    assert list((tmp_path / "scratch").iterdir()) == []

    assert metrics["steps"] == 16
    assert metrics["finalLoss"] < metrics["firstLoss"] - 0.3
    assert metrics["validationPerplexity"] < 1000  # a uniform guess over 1,000 ids scores 1000
    # 16 steps x 4 sequences x 2 processes x 64 tokens.
    assert metrics["tokensSeen"] == 16 * 4 * 2 * 64
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["parameterCount"]
    assert (output / "model" / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(output / "model")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer("Naloxone reverses the effect of clonidine.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [
        "step-00000012", "step-00000016"]
    assert json.loads((output / "manifest.json").read_text())["metrics"] == metrics
    records = progress(output)
    assert [r["completed"] for r in records if "gradNorm" in r] == list(range(1, 17))
    assert all(r["tokensPerSecond"] > 0 for r in records if "gradNorm" in r)
    assert records[-1]["validationPerplexity"] == pytest.approx(metrics["validationPerplexity"])

    # One process with twice the micro-batch trains on the same sequences in each step, so it
    # takes the same steps as the two DDP processes.
    single = tmp_path / "single"
    run_stage(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=16, microBatchSize=8),
              inputs["full"], single)
    two_processes, one_process = step_losses(output), step_losses(single)
    for step in range(1, 17):
        assert one_process[step] == pytest.approx(two_processes[step], rel=1e-4)


def test_resume_continues_from_checkpoint(make_config, tmp_path, inputs):
    """A resumed run continues at the latest checkpoint's step and counts only the new steps."""
    output = tmp_path / "out"
    resource = pretrain_resource(maxSteps=12, keepCheckpoints=3)
    run_stage(make_config, tmp_path, resource, inputs["full"], output)
    shutil.rmtree(output / "checkpoints" / "step-00000012")
    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)

    assert metrics["resumedFromStep"] == 8
    assert metrics["newSteps"] == 4
    assert metrics["steps"] == 12
    assert metrics["tokensSeen"] == 12 * 4 * 2 * 64
    records = progress(output)
    resumed = records.index(next(r for r in records if r["message"] == "Starting at step 8."))
    assert [r["completed"] for r in records[resumed:] if "gradNorm" in r] == [9, 10, 11, 12]
    assert metrics["firstLoss"] == step_losses(output)[1]


def test_resume_after_training_change_continues(make_config, tmp_path, inputs):
    """A changed spec.training, here a larger maxSteps and a lower learning rate, continues
    from the checkpoints, as when a run is extended or recovers from a divergence."""
    output = tmp_path / "out"
    run_stage(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=8), inputs["full"],
              output)
    longer = pretrain_resource(procs=1, maxSteps=12, learningRate=1e-3)
    metrics = run_stage(make_config, tmp_path, longer, inputs["full"], output, resume=True)

    assert metrics["resumedFromStep"] == 8
    assert metrics["newSteps"] == 4
    assert metrics["steps"] == 12


def test_resume_below_checkpoint_step_rejected(make_config, tmp_path, inputs):
    """A maxSteps below the latest checkpoint's step fails with a fix that needs no flag."""
    run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=8), inputs["tiny"])
    shorter = pretrain_resource(procs=1, maxSteps=6)
    with pytest.raises(StageError) as raised:
        run_in_process(make_config, tmp_path, shorter, inputs["tiny"], resume=True)
    assert raised.value.field == "spec.training.maxSteps"
    assert "raise maxSteps to at least 8" in str(raised.value)
    assert "delete the checkpoints after step 6 under" in str(raised.value)


def test_resume_of_another_spec_starts_over(make_config, tmp_path, inputs):
    """--resume continues only checkpoints of the same model, data and inputs (the resume key).
    The operator passes --resume to every attempt, so a changed model or an input that ran
    again with another digest must start from step 0, not from the earlier run's end."""
    output = tmp_path / "out"
    first = run_stage(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=4),
                      inputs["full"], output)
    changed = pretrain_resource(procs=1, maxSteps=4, model={"hiddenSize": 32})
    metrics = run_stage(make_config, tmp_path, changed, inputs["full"], output, resume=True)

    assert metrics["resumedFromStep"] is None
    assert metrics["newSteps"] == 4
    assert metrics["parameterCount"] < first["parameterCount"]
    state = json.loads((output / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["resumeKey"] == make_config(changed, inputs["full"], output=output).resume_key
    assert [step for step, _ in checkpoint.list_checkpoints(output / "checkpoints")] == [4]

    other_corpus = {**inputs["full"], "corpus": inputs["full"]["corpus"].model_copy(
        update={"digest": "sha256:another"})}
    again = run_stage(make_config, tmp_path, changed, other_corpus, output, resume=True)
    assert again["resumedFromStep"] is None
    assert again["newSteps"] == 4


def test_resume_reproduces_uninterrupted_run(make_config, tmp_path, inputs):
    """Resuming from step 4 repeats steps 5-8 exactly: weights, optimizer, RNG, data position."""
    output = tmp_path / "out"
    resource = pretrain_resource(procs=1, maxSteps=8, keepCheckpoints=3)
    run_stage(make_config, tmp_path, resource, inputs["full"], output)
    uninterrupted = step_losses(output)
    shutil.rmtree(output / "checkpoints" / "step-00000008")

    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)

    assert metrics["resumedFromStep"] == 4
    resumed = step_losses(output)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6)


def test_resume_after_exhausted_data_starts_next_epoch(make_config, tmp_path, inputs):
    """A resume whose data position is at the end of the data trains into the next epoch."""
    tiny = inputs["tiny"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny["tokenizer"].uri[len("file://"):])
    sequences = len(pack_split(tokenizer, tiny["corpus"].uri, "train", 64, tmp_path / "tokens"))
    steps_per_epoch = sequences // 4
    output = tmp_path / "out"
    resource = pretrain_resource(procs=1, maxSteps=steps_per_epoch + 3,
                                 checkpointInterval=steps_per_epoch, keepCheckpoints=2)
    run_stage(make_config, tmp_path, resource, tiny, output)
    # Keep only the checkpoint taken when the epoch's data ran out.
    shutil.rmtree(output / "checkpoints" / checkpoint.step_dir_name(steps_per_epoch + 3))
    saved = json.loads((output / "checkpoints" / checkpoint.step_dir_name(steps_per_epoch)
                        / "state.json").read_text())
    assert saved["step"] == steps_per_epoch

    metrics = run_stage(make_config, tmp_path, resource, tiny, output, resume=True)

    assert metrics["resumedFromStep"] == steps_per_epoch
    assert metrics["newSteps"] == 3
    assert metrics["steps"] == steps_per_epoch + 3
    assert progress(output)[-1]["epoch"] == 1


def test_resume_at_max_steps_trains_nothing_more(make_config, tmp_path, inputs):
    """A resume at maxSteps writes the model from the checkpoint and reports 0 new steps."""
    output = tmp_path / "out"
    resource = pretrain_resource(procs=1, maxSteps=4)
    first = run_stage(make_config, tmp_path, resource, inputs["full"], output)
    shutil.rmtree(output / "model")

    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)

    assert metrics["newSteps"] == 0
    assert metrics["finalLoss"] == first["finalLoss"]
    assert (output / "model" / "model.safetensors").is_file()


def run_in_process(make_config, tmp_path, resource, inputs, resume=False) -> dict:
    return stage.run(make_config(resource, inputs, output=tmp_path / "out"), resume=resume)


@pytest.mark.parametrize(
    ("training", "field", "message"),
    [
        ({"artifactUri": "nosuchproto://bucket/x"}, "spec.training.artifactUri",
         "no filesystem for"),
        ({"microBatchSize": 64}, "spec.corpusRef", "fewer than one micro-batch of 64"),
    ],
)
def test_bad_spec_rejected(make_config, tmp_path, inputs, training, field, message):
    resource = pretrain_resource(procs=1, maxSteps=2, **training)
    with pytest.raises(StageError, match=message) as caught:
        run_in_process(make_config, tmp_path, resource, inputs["tiny"])
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"maxPositionEmbeddings": 32}, "sequenceLength must not exceed"),
        ({"numHeads": 3}, "hiddenSize must be a multiple of spec.model.numHeads"),
    ],
)
def test_inconsistent_model_spec_rejected(model, message):
    with pytest.raises(ValidationError, match=message):
        KINDS["PretrainJob"].model_validate(pretrain_resource(model=model))


def test_spec_rule_checked_by_stage_too(make_config, tmp_path, inputs):
    """A config that skipped API validation still fails with a StageError, not a traceback."""
    config = make_config(pretrain_resource(procs=1), inputs["tiny"], output=tmp_path / "out")
    config.spec["sequenceLength"] = 1024
    with pytest.raises(StageError, match="sequenceLength must not exceed"):
        stage.run(config, resume=False)


def test_missing_tokenizer_output_rejected(make_config, tmp_path, inputs):
    empty = tmp_path / "empty-tokenizer"
    empty.mkdir()
    broken = {**inputs["full"], "tokenizer": ResolvedInput(
        kind="Tokenizer", name="pubmed", uri=f"file://{empty}", digest="sha256:e")}
    with pytest.raises(StageError, match="has no tokenizer.json"):
        run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=2), broken)


def test_resume_with_changed_model_rejected(make_config, tmp_path, inputs):
    """A config without a resume key, as written by hand, resumes a checkpoint only when its
    model, sequence length and strategy match. Other checkpoints are rejected with the fix."""
    run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=2), inputs["tiny"])
    changed = pretrain_resource(procs=1, model={"hiddenSize": 32}, maxSteps=4)
    config = make_config(changed, inputs["tiny"], output=tmp_path / "out")
    with pytest.raises(StageError, match="delete the checkpoints under .* to start over"):
        stage.run(config.model_copy(update={"resume_key": ""}), resume=True)


def test_non_finite_loss_fails_without_saving(make_config, tmp_path, inputs):
    """A learning rate of 1e30 blows up the weights, and the stage fails before saving them."""
    resource = pretrain_resource(procs=1, maxSteps=4, learningRate=1e30, warmupSteps=0)
    with pytest.raises(StageError, match=r"training stopped: the .* of step 2 is (nan|inf)"):
        run_in_process(make_config, tmp_path, resource, inputs["tiny"])
    output = tmp_path / "out"
    assert not (output / "model").exists()
    assert not (output / "checkpoints").exists()
    assert not (output / "manifest.json").exists()


def test_non_finite_loss_stops_all_ranks(make_config, tmp_path, inputs):
    """Under torchrun both ranks stop at the same step instead of one waiting on the other."""
    resource = pretrain_resource(maxSteps=4, learningRate=1e30, warmupSteps=0)
    path = tmp_path / "config.json"
    path.write_text(make_config(resource, inputs["full"], output=tmp_path / "out")
                    .model_dump_json())
    result = launch(path, procs=2)
    assert result.returncode != 0
    assert result.stderr.count("training stopped: the") == 2
    assert not (tmp_path / "out" / "model").exists()


def test_plain_process_exits_permanent_on_bad_spec(make_config, tmp_path, inputs):
    """`python -m lathe_trainer pretrain` without torchrun reports a bad spec with exit 42."""
    resource = pretrain_resource(procs=1, maxSteps=2, microBatchSize=64)
    path = tmp_path / "config.json"
    path.write_text(make_config(resource, inputs["tiny"], output=tmp_path / "out")
                    .model_dump_json())
    command = [sys.executable, "-m", "lathe_trainer", "pretrain", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == EXIT_PERMANENT
    assert "spec.corpusRef: the train split" in result.stderr


def test_malformed_documents_counted(make_config, tmp_path, inputs):
    corpus = Path(inputs["tiny"]["corpus"].uri.removeprefix("file://"))
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    with (copy / "train" / "shard-00000.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "no-text", "source": "x"}) + "\n")
        handle.write(json.dumps({"id": "blank", "source": "x", "text": "  "}) + "\n")
    patched = {**inputs["tiny"], "corpus": ResolvedInput(
        kind="Corpus", name="pubmed", uri=f"file://{copy}", digest="sha256:m")}
    metrics = run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=1),
                             patched)
    assert metrics["skippedDocuments"]["train"] == {"missingText": 1, "emptyText": 1}
    assert metrics["trainDocuments"] == 4


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_disjoint_and_complete(world_size):
    """One epoch deals every sequence to exactly one rank, independent of the world size."""
    samplers = [SequenceSampler(24, 2, rank, world_size, seed=7) for rank in range(world_size)]
    dealt = []
    for _ in range(24 // (2 * world_size)):
        for sampler in samplers:
            dealt += sampler.next_indices().tolist()
    assert sorted(dealt) == list(range(24))


def test_sampler_continues_into_next_epoch():
    sampler = SequenceSampler(10, 4, 0, 1, seed=0, position=DataPosition(epoch=0, cursor=8))
    indices = sampler.next_indices()
    assert sampler.position == DataPosition(epoch=1, cursor=4)
    assert len(indices) == 4


def test_example_parses_as_pretrain_job():
    resource = KINDS["PretrainJob"].model_validate(yaml.safe_load(EXAMPLE.read_text()))
    assert resource.metadata.name == "pubmed-lm"
    assert resource.spec.distributed.procs_per_node == 2
    assert resource.spec.sequence_length <= resource.spec.model.max_position_embeddings


def test_s3_artifacts_resume_exactly(make_config, tmp_path, inputs, s3_store):
    """With training.artifactUri on a real S3 store, checkpoints and the final model go there,
    and a resume from an S3 checkpoint repeats the uninterrupted run exactly."""
    from lathe_trainer.training import storage

    uri = f"s3://lathe/runs-{uuid.uuid4().hex}"
    output = tmp_path / "out"
    resource = pretrain_resource(procs=1, maxSteps=8, keepCheckpoints=3, artifactUri=uri)
    run_stage(make_config, tmp_path, resource, inputs["full"], output)
    uninterrupted = step_losses(output)
    filesystem, base = storage.resolve(uri)
    assert not (output / "checkpoints").exists()
    assert [step for step, _ in checkpoint.list_checkpoints(f"{uri}/checkpoints")] == [4, 8]
    published = {path.rsplit("/", 1)[-1] for path in filesystem.find(f"{base}/model")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= published, published

    storage.remove_tree(filesystem, f"{base}/checkpoints/step-00000008")
    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)

    assert metrics["resumedFromStep"] == 4
    resumed = step_losses(output)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6)


# -- lathe run: a changed spec continues or starts over -------------------------------------------


def run_locally(runner: LocalRunner, inputs, model: dict | None = None, storage_uri: str = "",
                **training) -> StageResult:
    """Run the one-process PretrainJob `lm` with the runner of `lathe run`."""
    document = pretrain_resource(procs=1, model=model, **training)
    if storage_uri:
        document["spec"]["storage"] = {"uri": storage_uri}
    return runner.run_stage(KINDS["PretrainJob"].model_validate(document), inputs)


def trained_steps(result: StageResult) -> list[int]:
    """Return the steps that the run wrote progress records for, in order."""
    return [r["completed"] for r in progress(Path(result.output_uri[len("file://"):]))
            if "gradNorm" in r]


def test_local_run_continues_changed_training(tmp_path, data_dir, inputs):
    """`lathe run` continues a finished PretrainJob whose maxSteps was raised, as the operator
    does. A stage directory without a recorded resume key, as earlier releases wrote it, and a
    changed model start over."""
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    first = run_locally(runner, inputs["full"], maxSteps=4)
    (first.directory / "resume-key").unlink()

    unrecorded = run_locally(runner, inputs["full"], maxSteps=8)
    longer = run_locally(runner, inputs["full"], maxSteps=12)
    output = Path(longer.output_uri[len("file://"):])
    continued_checkpoints = [step for step, _ in checkpoint.list_checkpoints(
        output / "checkpoints")]
    continued_steps = trained_steps(longer)
    continued_resume_key = (longer.directory / "resume-key").read_text()
    changed_model = run_locally(runner, inputs["full"], model={"hiddenSize": 32}, maxSteps=12)

    assert first.manifest["metrics"]["steps"] == 4
    # The token files lived in scratch/ during the run; no empty folder stays behind.
    assert not (first.directory / "scratch").exists()
    assert unrecorded.manifest["metrics"]["resumedFromStep"] is None
    assert unrecorded.manifest["metrics"]["newSteps"] == 8

    assert not longer.reused
    assert longer.manifest["stageKey"] != unrecorded.manifest["stageKey"]
    assert longer.manifest["metrics"]["resumedFromStep"] == 8
    assert longer.manifest["metrics"]["newSteps"] == 4
    assert longer.manifest["metrics"]["steps"] == 12
    assert continued_steps == [9, 10, 11, 12]
    assert continued_checkpoints == [8, 12]

    assert changed_model.manifest["metrics"]["resumedFromStep"] is None
    assert changed_model.manifest["metrics"]["newSteps"] == 12
    assert trained_steps(changed_model) == list(range(1, 13))
    state = json.loads((output / "checkpoints" / "step-00000012" / "state.json").read_text())
    assert state["resumeKey"] == (changed_model.directory / "resume-key").read_text()
    assert state["resumeKey"] != continued_resume_key


def test_local_run_failed_continuation_keeps_output(tmp_path, data_dir, inputs):
    """A maxSteps below the latest checkpoint is rejected before the output changes. A
    continuation that fails in the stage keeps the finished output in previous-output/, and a
    run of the old spec restores it instead of training again."""
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    finished = run_locally(runner, inputs["full"], maxSteps=4)
    output = Path(finished.output_uri[len("file://"):])
    previous = finished.directory / "previous-output"

    with pytest.raises(InvalidResourceError) as lowered:
        run_locally(runner, inputs["full"], maxSteps=2)
    digest_after_check = json.loads((output / "manifest.json").read_text())["digest"]
    # A learning rate of 1e30 blows up the weights, so the continuation fails in the stage.
    with pytest.raises(StageFailedError) as raised:
        run_locally(runner, inputs["full"], maxSteps=8, learningRate=1e30, warmupSteps=0)
    manifest_after_failure = (output / "manifest.json").exists()
    kept = json.loads((previous / "manifest.json").read_text())["digest"]
    written = json.loads((finished.directory / "status.json").read_text())
    again = run_locally(runner, inputs["full"], maxSteps=4)

    assert "raise maxSteps to at least 4" in str(lowered.value)
    assert digest_after_check == finished.manifest["digest"]
    assert raised.value.exit_code == EXIT_PERMANENT
    assert f"kept in {previous}" in str(raised.value)
    assert not manifest_after_failure
    assert kept == finished.manifest["digest"]
    assert written["phase"] == "Failed"
    assert again.reused
    assert again.manifest["digest"] == finished.manifest["digest"]
    assert (output / "model" / "model.safetensors").is_file()
    assert not previous.exists()


def test_local_run_continues_on_s3(tmp_path, data_dir, inputs, s3_store):
    """A PretrainJob whose spec.storage.uri is on S3 continues from the checkpoints there, and
    its continuation's manifest replaces the old one."""
    from lathe_trainer.training import storage

    uri = f"s3://lathe/continue-{uuid.uuid4().hex}"
    runner = LocalRunner(tmp_path / "workspace", data_dir)
    run_locally(runner, inputs["full"], storage_uri=uri, maxSteps=4)
    longer = run_locally(runner, inputs["full"], storage_uri=uri, maxSteps=6)

    filesystem, base = storage.resolve(uri)
    manifest = json.loads(filesystem.cat_file(f"{base}/manifest.json"))
    assert longer.output_uri == uri
    assert longer.manifest["metrics"]["resumedFromStep"] == 4
    assert longer.manifest["metrics"]["newSteps"] == 2
    assert manifest["stageKey"] == longer.manifest["stageKey"]
    assert [step for step, _ in checkpoint.list_checkpoints(f"{uri}/checkpoints")] == [4, 6]


@pytest.mark.parametrize(("plain", "expected"), [(False, "sum 1"), (True, "error")])
def test_wait_for_all_outlasts_collective_timeout(tmp_path, plain, expected):
    """A rank that arrives after the group's collective timeout (as a node that tokenizes
    longer) fails a plain barrier, but not wait_for_all."""
    worker = Path(__file__).with_name("wait_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(worker), str(tmp_path)]
    command += ["--plain"] if plain else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, failure_excerpt(result.stderr)
    assert (tmp_path / "rank-0.txt").read_text().startswith(expected)
