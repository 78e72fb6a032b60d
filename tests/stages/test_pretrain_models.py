"""PretrainJob model families, size presets, compute figures and curricula on PubMed abstracts.

Every run is a tiny model for a few steps in the test process, on the BC5CDR abstracts that
test_pretrain writes in the Corpus and Tokenizer output formats.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from tokenizers.models import WordLevel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    pipeline,
)

from lathe.api.pretrain import MODEL_PRESETS, PretrainJobSpec
from lathe.api.tokenizer import TokenizerSpec
from lathe_trainer.corpus.quality import quality_score
from lathe_trainer.pretrain import stage
from lathe_trainer.pretrain.model import FlopsEstimate, build_model, model_config
from lathe_trainer.pretrain.objectives import CausalLM, MaskedLM, SpanCorruption, span_counts
from lathe_trainer.stage import ResolvedInput, StageError
from lathe_trainer.tokenizer import training as tokenizer_training
from lathe_trainer.tokenizer.patterns import ProtectedMatcher
from lathe_trainer.training.flops import compute_optimal_tokens
from lathe_trainer.training.loss import token_loss_sum
from test_pretrain import (
    RUN_TIMEOUT_SECONDS,
    pretrain_resource,
    progress,
    read_pubtator,
    step_losses,
    write_corpus,
)

MLM_SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>", "<mask>"]

pytestmark = pytest.mark.slow


def write_tokenizer(root, texts, special_tokens) -> ResolvedInput:
    """Train and save a BPE with the Tokenizer stage's own training and saving code."""
    spec = TokenizerSpec.model_validate({"corpusRef": {"name": "pubmed"}, "vocabSize": 600,
                                         "minFrequency": 2, "specialTokens": special_tokens})
    tokenizer = tokenizer_training.build_tokenizer(spec, ProtectedMatcher([], lowercase=False))
    tokenizer_training.train(tokenizer, lambda: texts, spec, 600, lambda count: None)
    tokenizer_training.save(tokenizer, root)
    return ResolvedInput(kind="Tokenizer", name="pubmed", uri=f"file://{root}", digest="sha256:t")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir) -> dict[str, dict[str, ResolvedInput]]:
    """120 abstracts plus 20 noisy documents, with and without a <mask> token."""
    root = tmp_path_factory.mktemp("inputs")
    bc5cdr = data_dir / "pubmed" / "bc5cdr"
    train = read_pubtator(bc5cdr / "CDR_TrainingSet.PubTator.txt")[:120]
    for document in train:
        document["quality"] = quality_score(document["text"])
    noisy = [{"id": f"noisy-{n}", "source": "noise", "text": " ".join(["#$% @@ 12 ~~"] * 60),
              "quality": quality_score("#$% @@ 12 ~~")} for n in range(20)]
    validation = read_pubtator(bc5cdr / "CDR_DevelopmentSet.PubTator.txt")[:10]
    texts = [d["text"] for d in train]
    corpus = write_corpus(root / "corpus", train + noisy, validation)
    return {
        "mask": {"corpus": corpus,
                 "tokenizer": write_tokenizer(root / "mask", texts, MLM_SPECIAL_TOKENS)},
        "plain": {"corpus": corpus,
                  "tokenizer": write_tokenizer(root / "plain", texts, MLM_SPECIAL_TOKENS[:3])},
    }


def tiny_resource(architecture: str, **training) -> dict:
    training = {"maxSteps": 6, "checkpointInterval": 3, "evalInterval": 3, **training}
    resource = pretrain_resource(
        procs=1, model={"architecture": architecture, "maxPositionEmbeddings": 64}, **training,
    )
    resource["spec"]["sequenceLength"] = 32
    resource["spec"]["evalSequences"] = 8
    return resource


def run(make_config, resource, inputs, output, resume=False) -> dict:
    stage.run(make_config(resource, inputs, output=output), resume=resume)
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.parametrize("architecture, objective", [
    ("llama", "causalLM"),
    ("gpt2", "causalLM"),
    ("bert", "maskedLM"),
    ("t5", "spanCorruption"),
])
def test_architecture_loss_falls(make_config, tmp_path, inputs, architecture, objective):
    """Each family trains with its objective: the loss falls and a validation loss exists."""
    metrics = run(make_config, tiny_resource(architecture), inputs["mask"], tmp_path / "out")
    assert metrics["objective"] == objective
    assert metrics["finalLoss"] < metrics["firstLoss"]
    assert metrics["validationLoss"] is not None
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_bert_model_fills_mask(make_config, tmp_path, inputs):
    """The final BERT model and its tokenizer load with the Auto classes and serve fill-mask."""
    run(make_config, tiny_resource("bert"), inputs["mask"], tmp_path / "out")
    model_dir = tmp_path / "out" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.mask_token == "<mask>"
    fill_mask = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(model_dir),
                         tokenizer=tokenizer)
    predictions = fill_mask("The patient was given <mask> for the pain.", top_k=3)
    assert len(predictions) == 3


def test_compute_metrics_reported(make_config, tmp_path, inputs):
    metrics = run(make_config, tiny_resource("gpt2"), inputs["mask"], tmp_path / "out")
    parameters = metrics["parameterCount"]
    # gpt2: hidden 64, 2 layers, 64 positions, sequence 32 as in tiny_resource. The position
    # embedding is looked up, not multiplied; the token embedding is also the output layer.
    assert metrics["flopsPerToken"] == 6 * (parameters - 64 * 64) + 12 * 2 * 64 * 32
    assert metrics["computeOptimalTokens"] == 20 * parameters
    assert metrics["corpusTokens"] > 0


def test_bert_without_mask_token_rejected(make_config, tmp_path, inputs):
    with pytest.raises(StageError, match="add '<mask>' to the Tokenizer's specialTokens"):
        run(make_config, tiny_resource("bert"), inputs["plain"], tmp_path / "out")


def test_tokenizer_stage_keeps_mask_token(inputs):
    """An extra special token listed in the Tokenizer spec stays one unsplit token."""
    directory = inputs["mask"]["tokenizer"].uri.removeprefix("file://")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    assert "<mask>" in tokenizer.get_vocab()
    assert tokenizer.tokenize("a <mask> b").count("<mask>") == 1


def test_literal_mask_token_never_masked(make_config, tmp_path, inputs):
    """A `<mask>` written in the corpus is a special token, so masked LM never picks it."""
    from lathe.api import KINDS
    from lathe_trainer.pretrain.inputs import build_objective

    directory = inputs["mask"]["tokenizer"].uri.removeprefix("file://")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    resource = KINDS["PretrainJob"].model_validate(tiny_resource("bert"))
    config = make_config(tiny_resource("bert"), inputs["mask"], tmp_path / "out")
    objective = build_objective(config, resource.spec, tokenizer, len(tokenizer))
    mask_id = tokenizer.get_vocab()["<mask>"]
    assert mask_id in objective.special_ids.tolist()


@pytest.mark.parametrize("preset, hidden, layers, heads, intermediate, positions", [
    ("tiny", 128, 2, 4, 512, 512),
    ("125m", 768, 12, 12, 3072, 2048),
    ("350m", 1024, 24, 16, 4096, 2048),
    ("1.3b", 2048, 24, 16, 8192, 2048),
    ("7b", 4096, 32, 32, 11008, 4096),
])
def test_preset_dimensions(preset, hidden, layers, heads, intermediate, positions):
    dimensions = MODEL_PRESETS[preset]
    assert (dimensions.hidden_size, dimensions.num_layers, dimensions.num_heads,
            dimensions.intermediate_size, dimensions.max_position_embeddings) == (
        hidden, layers, heads, intermediate, positions)


def spec(**fields) -> PretrainJobSpec:
    return PretrainJobSpec.model_validate(
        {"corpusRef": {"name": "c"}, "tokenizerRef": {"name": "t"}, **fields})


def test_explicit_fields_override_preset():
    dimensions = spec(model={"preset": "125m", "numLayers": 3}).model.dimensions()
    assert dimensions.num_layers == 3
    assert dimensions.hidden_size == 768


def test_gpt2_125m_parameter_count_and_flops():
    """GPT-2 small with GPT-2's 50257-token vocabulary has its published 124,439,808 weights."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=ByteLevelBPETokenizer()._tokenizer, pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    config = model_config(spec(model={"architecture": "gpt2", "preset": "125m",
                                      "maxPositionEmbeddings": 1024}).model, tokenizer)
    config.vocab_size = 50257
    with torch.device("meta"):
        model = build_model(config)
    # Hand count: embeddings (50257 + 1024) x 768, 12 blocks of 12 x 768^2 + 13 x 768
    # weights and biases, and the final layer norm; the output layer is tied.
    hand = (50257 + 1024) * 768 + 12 * (12 * 768 ** 2 + 13 * 768) + 2 * 768
    assert model.num_parameters() == hand == 124_439_808
    # The position embedding has no multiplication; the tied token embedding has one.
    matmul = hand - 1024 * 768
    assert FlopsEstimate.of(model).per_token(1024) == 6 * matmul + 12 * 12 * 768 * 1024
    assert compute_optimal_tokens(hand) == 2_488_796_160


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose last ids are end-of-text, padding and mask."""
    vocab = {f"t{i}": i for i in range(vocab_size - 3)}
    vocab.update({"<|endoftext|>": vocab_size - 3, "<pad>": vocab_size - 2,
                  "<mask>": vocab_size - 1})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
        eos_token="<|endoftext|>", pad_token="<pad>", mask_token="<mask>")


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("sequence_length", [32, 128])
def test_flops_estimate_matches_flop_counter(architecture, sequence_length):
    """The FLOPs per token times the packed tokens of a step are within 3% of the matrix
    multiplications that torch's FlopCounterMode counts in a forward and backward pass.

    The vocabulary is large next to the model, so counting the untied llama input embedding,
    or charging every t5 token the encoder and decoder, misses by more than 20%.
    """
    vocab_size, batch = 1000, 2
    tokenizer = word_tokenizer(vocab_size)
    dimensions = {"hiddenSize": 64, "numLayers": 2, "numHeads": 4, "intermediateSize": 256,
                  "maxPositionEmbeddings": 128}
    config = model_config(spec(model={"architecture": architecture, **dimensions}).model,
                          tokenizer)
    # Eager attention is plain matrix multiplications, which FlopCounterMode counts on CPUs.
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = build_model(config)
    objective = {
        "bert": MaskedLM(vocab_size - 1, vocab_size, tokenizer.all_special_ids),
        "t5": SpanCorruption(config.vocab_size, vocab_size - 3, vocab_size - 2),
    }.get(architecture, CausalLM())
    sequences = torch.randint(0, vocab_size - 3, (batch, sequence_length),
                              generator=torch.Generator().manual_seed(0))
    prepared = objective.prepare(sequences, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(**prepared.inputs).logits
        token_loss_sum(logits, prepared.labels, shift=prepared.shift).backward()
    estimate = FlopsEstimate.of(model).per_token(sequence_length) * batch * sequence_length
    assert estimate / counter.get_total_flops() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("fields, message", [
    ({"model": {"architecture": "bert", "objective": "causalLM"}},
     "objective must match spec.model.architecture"),
    ({"model": {"architecture": "t5", "objective": "maskedLM"}},
     "objective must match spec.model.architecture"),
    ({"model": {"architecture": "rnn"}}, "architecture"),
    ({"model": {"preset": "13b"}}, "preset"),
    ({"model": {"preset": "125m", "numHeads": 5}}, "768 .* not a multiple of 5 heads"),
    ({"sequenceLength": 1024}, "exceeds the model's maximum positions 512"),
    ({"curriculum": {"stages": [{"untilStep": 5}, {"untilStep": 3}]}},
     r"stages\[1\].untilStep 3 is not after"),
    ({"curriculum": {"stages": [{"sequenceLength": 32}, {}]}}, r"stages\[0\].untilStep is missing"),
    ({"curriculum": {"stages": [{"untilStep": 5000}, {}]}}, "not below training.maxSteps"),
    ({"curriculum": {"stages": [{"sequenceLength": 1024}]}},
     r"stages\[0\].sequenceLength 1024 exceeds"),
    ({"curriculum": {"stages": [{"minQuality": 1.5}]}}, "minQuality"),
])
def test_bad_combination_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_t5_sequence_too_long_for_sentinels(make_config, tmp_path, inputs):
    resource = tiny_resource("t5")
    resource["spec"]["model"]["maxPositionEmbeddings"] = 4096
    resource["spec"]["sequenceLength"] = 2100
    with pytest.raises(StageError, match="more than the 100 sentinel tokens"):
        run(make_config, resource, inputs["mask"], tmp_path / "out")


def test_masked_lm_replaces_80_10_10():
    sequences = torch.arange(10, 1010).repeat(40, 1)
    batch = MaskedLM(mask_id=3, vocab_size=2000, special_ids=[0]).prepare(
        sequences, torch.Generator().manual_seed(0))
    selected = batch.labels != -100
    fraction = selected.float().mean().item()
    masked = (batch.inputs["input_ids"] == 3) & selected
    unchanged = (batch.inputs["input_ids"] == sequences) & selected
    assert 0.14 < fraction < 0.16
    assert 0.78 < masked.sum().item() / selected.sum().item() < 0.82
    assert 0.08 < unchanged.sum().item() / selected.sum().item() < 0.12
    assert torch.equal(batch.labels[selected], sequences[selected])


def test_masked_lm_labels_every_short_sequence():
    """Each 8-token row gets a label, else a step of such rows has no loss and fails."""
    sequences = torch.arange(10, 18).repeat(200, 1)
    sequences[:, 0] = 0  # a special token, which is never selected
    batch = MaskedLM(mask_id=3, vocab_size=2000, special_ids=[0]).prepare(
        sequences, torch.Generator().manual_seed(0))
    labelled = batch.labels != -100
    assert labelled.any(dim=1).all()
    assert not labelled[:, 0].any()
    assert torch.equal(batch.labels[labelled], sequences[labelled])


def test_masked_lm_leaves_all_special_row_unlabelled():
    sequences = torch.zeros(2, 8, dtype=torch.long)
    batch = MaskedLM(mask_id=3, vocab_size=2000, special_ids=[0]).prepare(
        sequences, torch.Generator().manual_seed(0))
    assert (batch.labels == -100).all()


def test_span_corruption_round_trips():
    """Filling each sentinel of the input with its target span restores the sequence."""
    objective = SpanCorruption(vocab_size=1100, eos_id=0, decoder_start_id=1)
    sequences = torch.arange(2, 66).view(1, 64)
    batch = objective.prepare(sequences, torch.Generator().manual_seed(1))
    noise, spans = span_counts(64)
    source = batch.inputs["input_ids"][0].tolist()
    target = batch.labels[0].tolist()
    assert len(source) == 64 - noise + spans + 1
    assert len(target) == noise + spans + 1
    spans_by_sentinel: dict[int, list[int]] = {}
    for token in target[:-1]:
        if token >= 1000:
            current = spans_by_sentinel.setdefault(token, [])
        else:
            current.append(token)
    restored = []
    for token in source[:-1]:
        restored += spans_by_sentinel[token] if token >= 1000 else [token]
    assert restored == sequences[0].tolist()
    assert batch.inputs["decoder_input_ids"][0, 0].item() == 1


def run_objective_worker(config_path: Path, record_dir: Path, resume: bool = False) -> list:
    """Run pretrain_objective_worker.py under torchrun with 2 processes; return each rank's
    corrupted positions per training micro-batch."""
    worker = Path(__file__).with_name("pretrain_objective_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(worker), str(config_path), str(record_dir)]
    command += ["--resume"] if resume else []
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((record_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("architecture", ["bert", "t5"])
def test_ranks_corrupt_different_positions(make_config, tmp_path, inputs, architecture):
    """Each of 2 processes masks (bert) or draws spans (t5) on its own, and a run resumed from
    the step-2 checkpoint draws steps 3 and 4 as the uninterrupted run did, on every rank."""
    resource = tiny_resource(architecture, maxSteps=4, checkpointInterval=2, keepCheckpoints=3)
    resource["spec"]["distributed"]["procsPerNode"] = 2
    output = tmp_path / "out"
    config_path = tmp_path / "config.json"
    config_path.write_text(make_config(resource, inputs["mask"], output=output)
                           .model_dump_json())
    uninterrupted = run_objective_worker(config_path, tmp_path / "uninterrupted")
    assert [len(steps) for steps in uninterrupted] == [4, 4]
    for step in range(4):
        assert uninterrupted[0][step] != uninterrupted[1][step], step

    shutil.rmtree(output / "checkpoints" / "step-00000004")
    resumed = run_objective_worker(config_path, tmp_path / "resumed", resume=True)
    for rank in (0, 1):
        assert resumed[rank] == uninterrupted[rank][2:], rank


CURRICULUM = {"stages": [
    {"untilStep": 3, "sequenceLength": 16, "minQuality": 0.8},
    {"sequenceLength": 32},
]}


def curriculum_resource() -> dict:
    resource = tiny_resource("llama", checkpointInterval=3)
    resource["spec"]["curriculum"] = CURRICULUM
    return resource


class RecordingTelemetry(stage.Telemetry):
    """Telemetry that records the FLOPs per token that MFU uses at each step."""

    flops_by_step: dict[int, float] = {}

    def step_done(self, step, loss):
        self.flops_by_step[step] = self.flops_per_token
        super().step_done(step, loss)


def test_curriculum_stages_reported(make_config, tmp_path, inputs, monkeypatch):
    output = tmp_path / "out"
    monkeypatch.setattr(stage, "Telemetry", RecordingTelemetry)
    monkeypatch.setattr(RecordingTelemetry, "flops_by_step", {})
    metrics = run(make_config, curriculum_resource(), inputs["mask"], output)
    first, second = metrics["curriculumStages"]
    assert metrics["curriculumStage"] == 1
    corpus = inputs["mask"]["corpus"].uri.removeprefix("file://")
    records = (Path(corpus) / "train" / "shard-00000.jsonl").read_text().splitlines()
    clean = sum(json.loads(line)["quality"] >= 0.8 for line in records)
    # The noisy documents score below 0.8, so only the second stage trains on them.
    assert 100 < clean < 140
    assert first["trainDocuments"] == clean
    assert second["trainDocuments"] == 140
    assert (first["sequenceLength"], second["sequenceLength"]) == (16, 32)
    records = progress(output)
    stages = {record["completed"]: record["curriculumStage"] for record in records}
    assert stages[2] == 0
    assert stages[4] == 1
    boundary = [record for record in records if "Curriculum stage 1" in record["message"]]
    assert [record["completed"] for record in boundary] == [3]
    assert metrics["tokensSeen"] == 3 * 4 * 16 + 3 * 4 * 32
    # The attention FLOPs grow with each stage's sequence length.
    estimate = FlopsEstimate.of(AutoModelForCausalLM.from_pretrained(output / "model"))
    assert first["flopsPerToken"] == estimate.per_token(16)
    assert second["flopsPerToken"] == estimate.per_token(32)
    assert metrics["flopsPerToken"] == estimate.per_token(32)
    assert RecordingTelemetry.flops_by_step == {
        1: estimate.per_token(16), 2: estimate.per_token(16), 3: estimate.per_token(16),
        4: estimate.per_token(32), 5: estimate.per_token(32), 6: estimate.per_token(32)}


def test_curriculum_resume_across_boundary(make_config, tmp_path, inputs):
    """A run resumed from the checkpoint at the stage boundary matches an uninterrupted run."""
    whole = tmp_path / "whole"
    run(make_config, curriculum_resource(), inputs["mask"], whole)
    parted = tmp_path / "parted"
    boundary = Path("checkpoints") / "step-00000003"
    shutil.copytree(whole / boundary, parted / boundary)
    metrics = run(make_config, curriculum_resource(), inputs["mask"], parted, resume=True)
    assert metrics["resumedFromStep"] == 3
    expected = step_losses(whole)
    resumed = step_losses(parted)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5)
