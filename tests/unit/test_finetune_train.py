"""Loss normalization of the FineTune loop: the split of a batch must not change the gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForTokenClassification

from lathe_trainer.finetune import checkpoint, train
from lathe_trainer.finetune.data import EncodedSentence
from lathe_trainer.finetune.train import LoopSettings, build_optimizer, lr_factor, train_step


def tiny_model() -> LlamaForTokenClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, num_labels=3, classifier_dropout=0.0,
        pad_token_id=1,
    )
    return LlamaForTokenClassification(config)


def settings(micro_batch_size: int, accumulation_steps: int) -> LoopSettings:
    return LoopSettings(
        max_steps=10, micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps,
        learning_rate=0.0, warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9, seed=0,
        checkpoint_interval=10, keep_checkpoints=1, eval_interval=10, pad_token_id=1,
        id2label={0: "O", 1: "B-X", 2: "I-X"},
    )


# Sentences of uneven length and uneven numbers of labelled tokens.
SENTENCES = [
    EncodedSentence([0, 5, 6, 7, 8, 9, 10], [-100, 0, 1, 2, -100, 0, 0], [-1, 0, 1, 2, 2, 3, 4],
                    5, False),
    EncodedSentence([0, 11, 12], [-100, 1, -100], [-1, 0, 0], 1, False),
]


def gradients(micro_batch_size: int, accumulation_steps: int) -> tuple[float, dict]:
    model = tiny_model()
    loop = settings(micro_batch_size, accumulation_steps)
    optimizer, scheduler = build_optimizer(model, loop)
    captured = {}

    def capture(_):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

    # NB: train_step zeroes the gradients after the step, so read them in the optimizer hook.
    optimizer.register_step_pre_hook(lambda *_: capture(None))
    parameters = [p for p in model.parameters() if p.requires_grad]
    batches = [SENTENCES[i:i + micro_batch_size] for i in range(0, 2, micro_batch_size)]
    result = train_step(model, optimizer, scheduler, parameters, batches, loop)
    return result.loss, captured


def test_accumulation_matches_one_batch():
    """Micro-batch 2 x accumulation 1 equals micro-batch 1 x accumulation 2."""
    loss_one, grads_one = gradients(2, 1)
    loss_two, grads_two = gradients(1, 2)
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for name, grad in grads_one.items():
        assert torch.allclose(grad, grads_two[name], atol=1e-6), name


@pytest.mark.parametrize(
    ("step", "factor"),
    [(0, 0.25), (3, 1.0), (4, 1.0), (10, 0.1)],
)
def test_lr_factor_table(step, factor):
    assert lr_factor(step, warmup=4, total=10) == pytest.approx(factor)


@pytest.mark.parametrize(("gpus", "procs", "world_size", "warned"), [
    (2, 1, 2, False),  # one process per GPU
    (0, 2, 2, False),
    (0, 1, 2, True),
    (2, 1, 1, True),
])
def test_world_size_warning_counts_gpus(monkeypatch, caplog, gpus, procs, world_size, warned):
    from lathe.api.finetune import FineTuneSpec
    from lathe_trainer.finetune import distributed, stage

    spec = FineTuneSpec.model_validate({
        "baseModel": {"uri": "file:///model"},
        "data": {"train": "train.tsv", "test": "test.tsv"},
        "resources": {"gpus": gpus},
        "distributed": {"procsPerNode": procs},
    })
    monkeypatch.setattr(distributed, "world_size", lambda: world_size)
    with caplog.at_level("WARNING", logger=stage.log.name):
        stage.warn_on_world_size(spec)
    assert ("processes but" in caplog.text) == warned


@pytest.mark.parametrize("form", ["state dicts", "bare tensors", "one bare tensor"])
def test_restore_rng_continues_stream(form):
    """Each form of saved RNG state, the current and the two that older checkpoints hold,
    continues the CPU stream where it was captured."""
    torch.manual_seed(3)
    state = train.rng_state()
    expected = torch.rand(4)
    saved = {"state dicts": [state], "bare tensors": [state["cpu"]],
             "one bare tensor": state["cpu"]}[form]
    torch.manual_seed(99)
    train._restore_rng(saved)
    assert torch.equal(torch.rand(4), expected)


def poison_logits(model, call: int) -> None:
    """Make the model's `call`-th forward pass (counting from 1) return NaN logits."""
    forward = model.forward
    calls = [0]

    def poisoned(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] == call:
            output.logits = output.logits * float("nan")
        return output

    model.forward = poisoned


def poison_gradient(model, step: int) -> None:
    """Make one gradient of optimizer step `step` (counting from 1) infinite."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == step else grad

    model.score.weight.register_hook(hook)


@pytest.mark.parametrize(("poison", "quantity"), [
    (poison_logits, "training loss"),
    (poison_gradient, "gradient norm"),
])
def test_non_finite_step_stops_before_update(tmp_path, poison, quantity):
    """A NaN loss or an infinite gradient at step 3 raises before the optimizer applies it, so
    the weights and every checkpoint stay finite."""
    model = tiny_model()
    loop = LoopSettings(**{**settings(2, 1).__dict__, "learning_rate": 1e-3,
                           "checkpoint_interval": 1})
    split = train.Split(SENTENCES, [["w"] * 5, ["w"]], [["O"] * 5, ["O"]])
    poison(model, 3)
    with pytest.raises(train.NonFiniteStepError, match=f"{quantity} of phase step 3"):
        train.run_phase("phase", model, split, None, loop, tmp_path, False,
                        lambda *args, **kwargs: None)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    saved = checkpoint.load_latest(tmp_path)
    assert saved["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in saved["trainable"].values())


def test_non_finite_step_fails_stage(monkeypatch):
    """The stage turns a non-finite step into a permanent StageError that names the fix."""
    from lathe.api.finetune import FineTuneSpec
    from lathe_trainer.finetune import stage
    from lathe_trainer.stage import StageError

    spec = FineTuneSpec.model_validate({
        "baseModel": {"uri": "file:///model"},
        "data": {"train": "train.tsv", "test": "test.tsv"},
    })

    def diverged(*args):
        raise train.NonFiniteStepError("training loss of lora step 7", float("nan"))

    monkeypatch.setattr(stage, "run_phase", diverged)
    with pytest.raises(StageError, match="training loss of lora step 7 is nan") as raised:
        stage.train_phase(None, spec, "lora")
    assert raised.value.field == "spec.training.learningRate"


def _seed_worker(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    from lathe_trainer.finetune.train import seed_process

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        seed_process(7)
        torch.save(torch.rand(8), f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_processes_draw_their_own_dropout(tmp_path):
    """Each process seeds its own stream, so two processes do not drop the same units. Rank 0
    keeps the stream of the seed, as a single process has it."""
    torch.multiprocessing.spawn(_seed_worker, args=(str(tmp_path / "init"), str(tmp_path / "r")),
                                nprocs=2)
    first, second = (torch.load(tmp_path / f"r.{rank}") for rank in range(2))
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(8))
    assert not torch.equal(first, second)


def run_with_faults(tmp_path, monkeypatch, fault_steps: str, **overrides) -> dict:
    """Run a 6-step phase whose steps in `fault_steps` have a NaN loss."""
    monkeypatch.setenv("LATHE_FAULT_NAN_STEPS", fault_steps)
    loop = LoopSettings(**{**settings(1, 1).__dict__, "max_steps": 6, "learning_rate": 1e-3,
                           "checkpoint_interval": 2, "keep_checkpoints": 5, **overrides})
    split = train.Split(SENTENCES, [["w"] * 5, ["w"]], [["O"] * 5, ["O"]])
    messages = []
    result = train.run_phase("phase", tiny_model(), split, None, loop, tmp_path, False,
                             lambda step, message, **metrics: messages.append(message))
    return {"result": result, "messages": messages}


def test_skip_moves_on_to_next_batch(tmp_path, monkeypatch):
    """A skipped step is tried again with the next batch, so maxSteps updates still run, and
    the checkpoint records the data position past the skipped batch."""
    run = run_with_faults(tmp_path, monkeypatch, "3,5", non_finite="skip")
    assert run["result"]["nonFiniteSteps"] == 2
    assert "phase: non-finite step 3 (skip): the training loss is nan." in run["messages"]
    saved = checkpoint.load_latest(tmp_path)
    assert (saved["step"], saved["dataStep"], saved["nonFiniteSteps"]) == (6, 8, 2)
    assert all(bool(torch.isfinite(v).all()) for v in saved["trainable"].values())


def test_rollback_restores_checkpoint(tmp_path, monkeypatch):
    """A rollback reloads the checkpoint of step 2 and continues with the batch after the
    offending one; the steps from there are trained again."""
    run = run_with_faults(tmp_path, monkeypatch, "4", non_finite="rollback")
    assert ("phase: non-finite step 4 (rollback): the training loss is nan. Rolled back to "
            "the checkpoint of step 2.") in run["messages"]
    assert run["messages"].count("phase: step 3/6") == 2
    saved = checkpoint.load_latest(tmp_path)
    # Steps 1-3, the failed step 4, then steps 3-6 again: 8 batches.
    assert (saved["step"], saved["dataStep"], saved["nonFiniteSteps"]) == (6, 8, 1)


@pytest.mark.parametrize(("fault_steps", "overrides", "cause"), [
    ("3", {"non_finite": "fail"}, "policy"),
    ("2,3", {"non_finite": "skip", "max_non_finite_steps": 1}, "limit"),
    ("1", {"non_finite": "rollback"}, "no-checkpoint"),
])
def test_unrecovered_step_raises(tmp_path, monkeypatch, fault_steps, overrides, cause):
    with pytest.raises(train.NonFiniteStepError, match="training loss of phase step") as raised:
        run_with_faults(tmp_path, monkeypatch, fault_steps, **overrides)
    assert raised.value.cause == cause


@pytest.mark.parametrize(("cause", "field", "fix"), [
    ("limit", "spec.training.maxNonFiniteSteps", "the limit is 10"),
    ("no-checkpoint", "spec.training.nonFinite", "Lower spec.training.checkpointInterval"),
])
def test_unrecovered_step_names_field(monkeypatch, cause, field, fix):
    from lathe.api.finetune import FineTuneSpec
    from lathe_trainer.finetune import stage
    from lathe_trainer.stage import StageError

    spec = FineTuneSpec.model_validate({
        "baseModel": {"uri": "file:///model"},
        "data": {"train": "train.tsv", "test": "test.tsv"},
        "training": {"nonFinite": "rollback"},
    })

    def diverged(*args):
        raise train.NonFiniteStepError("training loss of lora step 7", float("nan"), cause)

    monkeypatch.setattr(stage, "run_phase", diverged)
    with pytest.raises(StageError, match=fix) as raised:
        stage.train_phase(None, spec, "lora")
    assert raised.value.field == field


def test_fp16_overflow_lowers_scale_without_counting(tmp_path):
    """In fp16 an infinite gradient is an overflow of the loss scale: the scaler skips the
    update and halves the scale, and the step is tried again with the next batch rather
    than counted as non-finite."""
    model = tiny_model()
    # The third backward pass, whichever step it belongs to.
    poison_gradient(model, 3)
    loop = LoopSettings(**{**settings(1, 1).__dict__, "max_steps": 4, "learning_rate": 1e-3,
                           "checkpoint_interval": 4, "precision": "fp16"})
    split = train.Split(SENTENCES, [["w"] * 5, ["w"]], [["O"] * 5, ["O"]])
    messages = []
    result = train.run_phase("phase", model, split, None, loop, tmp_path, False,
                             lambda step, message, **metrics: messages.append(message))
    # The initial scale, 2**16, overflows on its own as well, before the poisoned backward.
    overflows = [message for message in messages if "fp16 loss scale overflow" in message]
    assert len(overflows) >= 1
    assert result["nonFiniteSteps"] == 0
    assert result["scalerSkippedSteps"] == len(overflows)
    saved = checkpoint.load_latest(tmp_path)
    assert saved["step"] == 4
    assert saved["dataStep"] == 4 + len(overflows)
    assert saved["gradScaler"]["scale"] == 2.0 ** (16 - len(overflows))


def test_compiled_phase_follows_eager(tmp_path):
    """With compile, the training steps run through torch.compile and reach the eager losses,
    and the checkpoint keeps the model's own parameter names."""
    from torch._dynamo.utils import counters

    split = train.Split(SENTENCES, [["w"] * 5, ["w"]], [["O"] * 5, ["O"]])
    losses = {}
    counters.clear()
    for compiled in (False, True):
        loop = LoopSettings(**{**settings(1, 1).__dict__, "max_steps": 3, "learning_rate": 1e-3,
                               "checkpoint_interval": 3, "compile": compiled})
        recorded = []
        train.run_phase("phase", tiny_model(), split, None, loop, tmp_path / str(compiled),
                        False, lambda step, message, **metrics: recorded.append(metrics["loss"]))
        losses[compiled] = recorded
    assert counters["stats"]["unique_graphs"] >= 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    saved = checkpoint.load_latest(tmp_path / "True")
    assert set(saved["trainable"]) == {name for name, _ in tiny_model().named_parameters()}


def test_fp16_base_trains_in_fp16_autocast(tmp_path):
    """A base model stored in float16 loads with float32 weights, which fp16 autocast and its
    loss scaler need: the scaler cannot unscale float16 gradients."""
    from lathe_trainer.finetune.model import load_pretrained

    base = tiny_model()
    base.half().save_pretrained(tmp_path / "base")
    model = load_pretrained(tmp_path / "base", ["O", "B-X", "I-X"])
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    loop = LoopSettings(**{**settings(1, 1).__dict__, "max_steps": 2, "learning_rate": 1e-3,
                           "checkpoint_interval": 2, "precision": "fp16"})
    split = train.Split(SENTENCES, [["w"] * 5, ["w"]], [["O"] * 5, ["O"]])
    result = train.run_phase("phase", model, split, None, loop, tmp_path / "phase", False,
                             lambda *args, **kwargs: None)
    assert result["steps"] == 2
