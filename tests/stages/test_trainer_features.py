"""Trainer features of the PretrainJob stage: precision, non-finite steps, fsspec stores, FSDP
and the Prometheus endpoint, on real PubMed abstracts with a tiny Llama.

The inputs and helpers come from test_pretrain, so both files train on the same data.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import urllib.request
from pathlib import Path

import fsspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from lathe.k8s import progress as operator_progress
from lathe_trainer.pretrain import stage
from lathe_trainer.pretrain.model import build_model
from lathe_trainer.stage import StageError
from lathe_trainer.training import checkpoint
from test_pretrain import (  # noqa: F401 (the fixtures are used by name)
    inputs,
    launch,
    one_thread,
    pretrain_resource,
    progress,
    run_stage,
    step_losses,
)

pytestmark = pytest.mark.slow


def run_in_process(make_config, tmp_path, resource, inputs, resume=False):
    output = tmp_path / "out"
    config = make_config(resource, inputs, output=output)
    stage.run(config, resume=resume)
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(make_config, tmp_path, inputs, precision):
    resource = pretrain_resource(procs=1, maxSteps=4, precision=precision)
    metrics = run_in_process(make_config, tmp_path, resource, inputs["full"])
    assert metrics["precision"] == precision
    assert metrics["attentionImplementation"] == "lathe_sdpa"
    assert metrics["steps"] == 4
    assert metrics["finalLoss"] < metrics["firstLoss"]
    assert metrics["mfu"] is None  # no MFU without a GPU peak FLOP/s


def test_compiled_bf16_follows_eager(make_config, tmp_path, inputs):
    """spec.training.compile compiles the model and the loss. The step losses stay within
    rounding of the eager run's, with the float32 attention of short sequences in both."""
    runs = {}
    for name, compile in (("eager", False), ("compiled", True)):
        resource = pretrain_resource(procs=1, maxSteps=4, precision="bf16", compile=compile)
        (tmp_path / name).mkdir()
        runs[name] = run_in_process(make_config, tmp_path / name, resource, inputs["full"])
        runs[name]["losses"] = step_losses(tmp_path / name / "out")
    assert runs["compiled"]["compiled"] is True
    assert runs["eager"]["compiled"] is False
    assert runs["compiled"]["attentionImplementation"] == "lathe_sdpa"
    assert sorted(runs["compiled"]["losses"]) == [1, 2, 3, 4]
    for step, loss in runs["eager"]["losses"].items():
        assert runs["compiled"]["losses"][step] == pytest.approx(loss, rel=0.02)


def test_fp32_keeps_sdpa(make_config, tmp_path, inputs):
    resource = pretrain_resource(procs=1, maxSteps=2, precision="fp32")
    metrics = run_in_process(make_config, tmp_path, resource, inputs["tiny"])
    assert metrics["attentionImplementation"] == "sdpa"


def test_fp16_resume_keeps_loss_scale(make_config, tmp_path, inputs):
    resource = pretrain_resource(procs=1, maxSteps=4, precision="fp16")
    run_in_process(make_config, tmp_path, resource, inputs["tiny"])
    saved = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "out" / "checkpoints"))
    assert saved.state["train"]["gradScaler"]["scale"] > 0


def test_fp16_overflow_steps_not_counted(make_config, tmp_path, inputs, monkeypatch):
    """Steps whose scaled fp16 gradients overflow, here because the loss scale starts at 2^24,
    skip the update and count towards neither maxSteps nor the learning-rate schedule."""

    def high_scale_scaler(device, precision):
        return torch.amp.GradScaler(device.type, init_scale=2.0 ** 24)

    monkeypatch.setattr(stage.precision, "grad_scaler", high_scale_scaler)
    resource = pretrain_resource(procs=1, maxSteps=4, precision="fp16")
    metrics = run_in_process(make_config, tmp_path, resource, inputs["full"])
    assert metrics["scalerSkippedSteps"] > 0
    assert metrics["steps"] == 4
    assert metrics["tokensSeen"] == 4 * 4 * 64
    records = progress(tmp_path / "out")
    steps = [r for r in records if "gradNorm" in r]
    assert [r["completed"] for r in steps] == [1, 2, 3, 4]
    assert all(r["gradNorm"] < 100 for r in steps)
    overflows = [r for r in records if "loss scale overflow" in r["message"]]
    assert len(overflows) == metrics["scalerSkippedSteps"]
    saved = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "out" / "checkpoints"))
    assert saved.scheduler["last_epoch"] == 4
    assert saved.state["train"]["scalerSkippedSteps"] == metrics["scalerSkippedSteps"]


def test_fp16_nan_gradients_fail_at_min_scale(make_config, tmp_path, inputs, monkeypatch):
    """NaN gradients that no loss scale removes halve the scale down to 1, then fail the run
    as a non-finite step, instead of skipping every step while the scale falls to 0."""
    build_model_before = stage.build_model

    def build_with_nan_gradients(config):
        model = build_model_before(config)
        backward_passes = [0]

        def poison(grad):
            backward_passes[0] += 1
            return grad * float("nan") if backward_passes[0] >= 3 else grad

        model.model.norm.weight.register_hook(poison)
        return model

    monkeypatch.setattr(stage, "build_model", build_with_nan_gradients)
    skip_overflow_before = stage._Trainer._skip_overflow

    def skip_overflow_at_most_100(trainer, result, sampler):
        skip_overflow_before(trainer, result, sampler)
        # Without the minimum scale the run would skip steps forever.
        assert trainer.state.scaler_skipped_steps < 100, "the run skips steps without end"

    monkeypatch.setattr(stage._Trainer, "_skip_overflow", skip_overflow_at_most_100)
    resource = pretrain_resource(procs=1, maxSteps=6, precision="fp16")
    with pytest.raises(StageError, match="gradient norm of step 3 is nan"):
        run_in_process(make_config, tmp_path, resource, inputs["full"])
    skipped = [record for record in progress(tmp_path / "out")
               if "loss scale overflow" in record["message"]]
    # The default initial scale 2^16 halves 16 times to reach 1.
    assert len(skipped) == 16
    assert "fell to 1" in skipped[-1]["message"]


def test_nan_step_fails_by_default(make_config, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "3")
    resource = pretrain_resource(procs=1, maxSteps=6)
    with pytest.raises(StageError, match=r"training loss of step 3 is nan.*nonFinite"):
        run_in_process(make_config, tmp_path, resource, inputs["full"])


def test_nan_step_skipped(make_config, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "3,5")
    resource = pretrain_resource(procs=1, maxSteps=6, nonFinite="skip")
    metrics = run_in_process(make_config, tmp_path, resource, inputs["full"])
    assert metrics["nonFiniteSteps"] == 2
    assert metrics["steps"] == 6
    records = progress(tmp_path / "out")
    assert any("Non-finite step 3 (skip)" in r["message"] for r in records)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_step_rolls_back(make_config, tmp_path, inputs, monkeypatch):
    """A NaN at step 6 reloads the step-4 checkpoint; steps 5-6 are redone on later data."""
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "6")
    resource = pretrain_resource(procs=1, maxSteps=8, nonFinite="rollback")
    metrics = run_in_process(make_config, tmp_path, resource, inputs["full"])
    assert metrics["nonFiniteSteps"] == 1
    assert metrics["steps"] == 8
    completed = [r["completed"] for r in progress(tmp_path / "out") if "gradNorm" in r]
    assert completed == [1, 2, 3, 4, 5, 5, 6, 7, 8]


def curriculum_rollback_resource() -> dict:
    """Stage 0 (32 tokens) to step 6, stage 1 (64 tokens) to step 10, checkpoints every 4."""
    resource = pretrain_resource(procs=1, maxSteps=10, nonFinite="rollback",
                                 checkpointInterval=4, evalInterval=100, keepCheckpoints=3)
    resource["spec"]["curriculum"] = {"stages": [{"untilStep": 6, "sequenceLength": 32},
                                                 {"sequenceLength": 64}]}
    return resource


def test_rollback_into_earlier_stage(make_config, tmp_path, inputs, monkeypatch):
    """A NaN at step 8 (stage 1) rolls back to the step-4 checkpoint of stage 0: steps 5-6
    train on stage 0 again, from the checkpoint's data position, as a resumed run would."""
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "8")
    output = tmp_path / "out"
    stage.run(make_config(curriculum_rollback_resource(), inputs["full"], output=output),
              resume=False)
    records = progress(output)
    rollback = next(r for r in records if "(rollback)" in r["message"])
    assert rollback["message"].startswith("Non-finite step 8 (rollback)")
    assert "Rolled back to the checkpoint of step 4" in rollback["message"]
    assert rollback["completed"] == 4
    assert rollback["curriculumStage"] == 0
    after = records[records.index(rollback) + 1:]
    stages = {r["completed"]: r["curriculumStage"] for r in after if "gradNorm" in r}
    assert stages == {5: 0, 6: 0, 7: 1, 8: 1, 9: 1, 10: 1}
    saved = checkpoint.load(output / "checkpoints" / "step-00000004")
    assert saved.state["train"]["dataPosition"] == {"epoch": 0, "cursor": 16}

    monkeypatch.delenv("LATHE_FAULT_NAN_STEPS")
    resumed = tmp_path / "resumed"
    boundary = Path("checkpoints") / "step-00000004"
    shutil.copytree(output / boundary, resumed / boundary)
    stage.run(make_config(curriculum_rollback_resource(), inputs["full"], output=resumed),
              resume=True)
    rolled_back = {r["completed"]: r["loss"] for r in after if "gradNorm" in r}
    losses = {r["completed"]: r["loss"] for r in progress(resumed) if "gradNorm" in r}
    for step in range(5, 11):
        assert losses[step] == pytest.approx(rolled_back[step], rel=1e-5), step


def test_skipped_step_not_evaluated_or_saved_again(make_config, tmp_path, inputs, monkeypatch):
    """A skipped step 1 saves no step-0 checkpoint, and a skipped step 5 neither evaluates nor
    saves step 4 a second time."""
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "1,5")
    saved_steps = []
    save = checkpoint.save

    def recording_save(context, root, step, *args, **kwargs):
        saved_steps.append(step)
        return save(context, root, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    resource = pretrain_resource(procs=1, maxSteps=6, nonFinite="skip", checkpointInterval=4,
                                 evalInterval=4, keepCheckpoints=3)
    metrics = run_in_process(make_config, tmp_path, resource, inputs["full"])
    assert metrics["nonFiniteSteps"] == 2
    assert saved_steps == [4, 6]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000006"]
    evaluated = [r["completed"] for r in progress(tmp_path / "out") if "validationLoss" in r]
    assert evaluated == [4, 6]


def test_rollback_keeps_lowered_learning_rate(make_config, tmp_path, inputs, monkeypatch):
    """A run resumed with a lower learningRate keeps it after rolling back to a checkpoint that
    the earlier run, with the higher rate, wrote."""
    output = tmp_path / "out"
    first = pretrain_resource(procs=1, maxSteps=4, learningRate=3e-3, evalInterval=100)
    stage.run(make_config(first, inputs["full"], output=output), resume=False)
    earlier = len(progress(output))
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "6")
    second = pretrain_resource(procs=1, maxSteps=8, learningRate=3e-5, nonFinite="rollback",
                               evalInterval=100)
    stage.run(make_config(second, inputs["full"], output=output), resume=True)
    records = progress(output)[earlier:]
    assert any("(rollback)" in r["message"] for r in records)
    rates = {r["completed"]: r["learningRate"] for r in records if "learningRate" in r}
    assert set(rates) >= {5, 6, 7, 8}
    assert max(rates.values()) <= 3e-5


def test_rollback_without_checkpoint_fails(make_config, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "2")
    resource = pretrain_resource(procs=1, maxSteps=6, nonFinite="rollback")
    with pytest.raises(StageError, match="no checkpoint to roll back to"):
        run_in_process(make_config, tmp_path, resource, inputs["full"])


def test_skip_limit_fails(make_config, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", "1,2,3")
    resource = pretrain_resource(procs=1, maxSteps=6, nonFinite="skip", maxNonFiniteSteps=2)
    with pytest.raises(StageError, match="maxNonFiniteSteps: training stopped"):
        run_in_process(make_config, tmp_path, resource, inputs["full"])


def test_memory_store_checkpoints_and_model(make_config, tmp_path, inputs):
    """memory:// is the stand-in remote filesystem: checkpoints keep the newest 2, model lands."""
    uri = "memory://lathe-test/pretrain"
    resource = pretrain_resource(procs=1, maxSteps=10, checkpointInterval=2, artifactUri=uri)
    run_in_process(make_config, tmp_path, resource, inputs["tiny"])
    filesystem = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in filesystem.ls(f"{uri}/checkpoints",
                                                                detail=False))
    assert names == ["step-00000008", "step-00000010"]
    assert filesystem.isfile(f"{uri}/model/model.safetensors")
    assert not (tmp_path / "out" / "checkpoints").exists()

    filesystem.rm(f"{uri}/checkpoints/step-00000010", recursive=True)
    metrics = run_in_process(make_config, tmp_path, resource, inputs["tiny"], resume=True)
    assert metrics["resumedFromStep"] == 8
    filesystem.rm("/lathe-test", recursive=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_served_by_rank_zero(make_config, tmp_path, inputs, monkeypatch):
    """Scrape the endpoint while training runs; the final metrics fit the termination message."""
    port = free_port()
    monkeypatch.setenv("LATHE_TRAINER_METRICS_PORT", str(port))
    monkeypatch.setenv("LATHE_TRAINER_METRICS_ADDRESS", "127.0.0.1")
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("LATHE_TERMINATION_LOG", str(termination))
    scraped: list[str] = []
    read_by_operator: list[dict] = []
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                if "lathe_training_step{" in text:
                    scraped.append(text)
                # The operator's read of rank 0's port, as for a claim it does not mount.
                record = operator_progress.read_pod_metrics("127.0.0.1", port)
                if record is not None:
                    read_by_operator.append(record)
            except OSError:
                pass
            stop.wait(0.05)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=8),
                       inputs["full"])
    finally:
        stop.set()
        scraper.join()
    assert scraped, "the metrics endpoint never answered with training gauges"
    text = scraped[-1]
    for name in ("lathe_training_loss", "lathe_training_tokens_per_second",
                 "lathe_training_step", "lathe_training_peak_memory_bytes"):
        assert f'{name}{{kind="PretrainJob",name="lm",namespace="default"}}' in text
    assert read_by_operator, "the operator's read of the port never found a finished step"
    record = read_by_operator[-1]
    assert 1 <= record["completed"] <= 8
    assert record["total"] == 8
    assert record["tokensSeen"] > 0
    assert "etaSeconds" in record
    message = json.loads(termination.read_text())
    assert message["metrics"]["nonFiniteSteps"] == 0
    assert message["metrics"]["tokensPerSecond"] > 0
    assert message["metrics"]["peakMemoryBytes"] > 0


def test_fsdp_two_processes_train_and_resume(make_config, tmp_path, inputs):
    """FSDP2 on gloo: two CPU processes train, save full checkpoints, and resume from them."""
    output = tmp_path / "out"
    resource = pretrain_resource(maxSteps=6)
    resource["spec"]["distributed"]["strategy"] = "fsdp"
    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output)
    assert metrics["strategy"] == "fsdp"
    assert metrics["finalLoss"] < metrics["firstLoss"]
    saved = checkpoint.load(checkpoint.latest_checkpoint(output / "checkpoints"))
    assert saved.model["model.embed_tokens.weight"].shape[1] == 64  # gathered, not a shard

    shutil.rmtree(output / "checkpoints" / "step-00000006")
    resumed = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)
    assert resumed["resumedFromStep"] == 4
    assert resumed["steps"] == 6
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    assert model.model.embed_tokens.weight.shape[1] == 64


def test_fsdp_resume_on_more_processes(make_config, tmp_path, inputs):
    """An FSDP run of one process leaves the model unwrapped and saves the plain optimizer
    format, which two FSDP processes must load, moments and step counts included."""
    output = tmp_path / "out"
    resource = pretrain_resource(procs=1, maxSteps=4)
    resource["spec"]["distributed"]["strategy"] = "fsdp"
    run_stage(make_config, tmp_path, resource, inputs["full"], output)
    saved = checkpoint.load(checkpoint.latest_checkpoint(output / "checkpoints"))
    assert list(saved.optimizer["state"])[0] == 0  # the plain format

    resource = pretrain_resource(procs=2, maxSteps=6)
    resource["spec"]["distributed"]["strategy"] = "fsdp"
    resumed = run_stage(make_config, tmp_path, resource, inputs["full"], output, resume=True)

    assert resumed["resumedFromStep"] == 4
    assert resumed["steps"] == 6
    saved = checkpoint.load(checkpoint.latest_checkpoint(output / "checkpoints"))
    adam_steps = {float(state["step"]) for state in saved.optimizer["state"].values()}
    assert adam_steps == {6.0}


@pytest.mark.parametrize("architecture", ["gpt2", "t5"])
def test_fsdp_shards_other_architectures(make_config, tmp_path, inputs, architecture):
    """FSDP2 shards GPT-2 blocks and T5 blocks, whose sublayers sit in nested lists."""
    output = tmp_path / "out"
    resource = pretrain_resource(maxSteps=3, model={"architecture": architecture})
    resource["spec"]["distributed"]["strategy"] = "fsdp"
    metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output)
    assert metrics["strategy"] == "fsdp"
    assert metrics["steps"] == 3


def test_fsdp_too_few_validation_sequences(make_config, tmp_path, inputs):
    """Under FSDP every process joins each evaluation, so one validation sequence for two
    processes is rejected before training instead of hanging at the first evaluation."""
    resource = pretrain_resource(maxSteps=3)
    resource["spec"]["evalSequences"] = 1
    resource["spec"]["distributed"]["strategy"] = "fsdp"
    config = make_config(resource, inputs["full"], output=tmp_path / "out")
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    result = launch(path, 2)
    assert result.returncode != 0
    assert ("spec.evalSequences: 1 validation sequences leave some of the 2 FSDP processes "
            "without one; raise evalSequences to at least 2.") in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_gradient_checkpointing_keeps_losses(make_config, tmp_path, inputs, monkeypatch):
    """Recomputing the activations changes neither the losses nor the FLOPs per token."""
    built = []

    def recording_build_model(architecture):
        built.append(build_model(architecture))
        return built[-1]

    monkeypatch.setattr(stage, "build_model", recording_build_model)
    runs = {}
    for enabled in (False, True):
        output = tmp_path / f"checkpointing-{enabled}"
        resource = pretrain_resource(procs=1, maxSteps=4, gradientCheckpointing=enabled)
        stage.run(make_config(resource, inputs["full"], output=output), resume=False)
        runs[enabled] = json.loads((output / "metrics.json").read_text()), step_losses(output)
    assert not built[0].is_activation_checkpointing
    assert built[1].is_activation_checkpointing
    (plain, plain_losses), (checkpointed, checkpointed_losses) = runs[False], runs[True]
    assert checkpointed["gradientCheckpointing"] is True
    assert checkpointed["flopsPerToken"] == plain["flopsPerToken"]
    assert sorted(checkpointed_losses) == [1, 2, 3, 4]
    for step, loss in plain_losses.items():
        assert checkpointed_losses[step] == pytest.approx(loss, abs=1e-5), step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_checkpointing_two_processes(make_config, tmp_path, inputs, strategy):
    """Under DDP and FSDP2 on gloo, gradient checkpointing trains to the same losses."""
    losses = {}
    for enabled in (False, True):
        output = tmp_path / f"checkpointing-{enabled}"
        resource = pretrain_resource(maxSteps=4, gradientCheckpointing=enabled)
        resource["spec"]["distributed"]["strategy"] = strategy
        metrics = run_stage(make_config, tmp_path, resource, inputs["full"], output)
        assert metrics["gradientCheckpointing"] is enabled
        losses[enabled] = step_losses(output)
    assert sorted(losses[True]) == [1, 2, 3, 4]
    for step, loss in losses[False].items():
        assert losses[True][step] == pytest.approx(loss, abs=1e-5), step


def test_resume_under_other_strategy_rejected(make_config, tmp_path, inputs):
    """Without a resume key, as in a config written by hand, a checkpoint of another strategy
    is rejected. With a key, the changed spec starts over, which test_pretrain covers."""
    run_in_process(make_config, tmp_path, pretrain_resource(procs=1, maxSteps=3),
                   inputs["tiny"])
    changed = pretrain_resource(procs=1, maxSteps=4)
    changed["spec"]["distributed"]["strategy"] = "fsdp"
    config = make_config(changed, inputs["tiny"], output=tmp_path / "out")
    with pytest.raises(StageError, match="spec.distributed.strategy: .*strategy='ddp'"):
        stage.run(config.model_copy(update={"resume_key": ""}), resume=True)


def test_nan_validation_loss_keeps_json_valid(make_config, tmp_path, inputs, monkeypatch):
    """A NaN validation loss is reported as missing, because JSON has no NaN."""
    monkeypatch.setattr(stage, "evaluate", lambda *args, **kwargs: float("nan"))
    resource = pretrain_resource(procs=1, maxSteps=2)
    run_in_process(make_config, tmp_path, resource, inputs["tiny"])

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    text = (tmp_path / "out" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=reject)
    assert metrics["validationLoss"] is None
    assert metrics["validationPerplexity"] is None
    for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=reject)
