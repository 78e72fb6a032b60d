"""Compare the PretrainJob trainer with Hugging Face `transformers.Trainer`, side by side.

Usage: `python benchmarks/trainer.py [--precision fp32|bf16] [--data-dir ../shared/data]
[--steps 40] [--repeats 1] [--compile] [--hf-reference static-ddp] [--hf-reference compile]`.
It builds a byte-level BPE tokenizer and a Corpus output from the BC5CDR PubTator abstracts in a
temporary workspace. Then it trains the same tiny Llama (hidden 256, 4 layers) on the same
sequences with the same micro-batch, learning-rate schedule and precision twice: fp32, or
bf16 autocast (`--precision bf16`, which `spec.training.precision: bf16` and
`TrainingArguments(bf16=True)` give). Each run is 2 processes under torchrun with the gloo
backend (DDP):

1. Lathe: the real stage, `python -m lathe_trainer pretrain --config ...` (eager), and with
   `--compile` once more with `spec.training.compile: true`.
2. Hugging Face: `transformers.Trainer` at its defaults in a worker of this script
   (`--hf-worker`), and once more for each `--hf-reference` with the settings that
   HF_REFERENCES names, for reference.

Both rates come from the same measurement: the wall-clock time between the end of step
`steps - window` and the end of the last step (Lathe's progress.jsonl timestamps, a
TrainerCallback for Hugging Face), times the input tokens of those steps. The warm-up steps
before the window and the start-up of the processes are therefore excluded on both sides.
Last, PROCESSES processes run only the matrix products of one training step, over and over,
at the same time (`--matmul-worker`), in float32 or bfloat16: the rate no trainer of this
model at that precision can pass here, which shows how much room the two trainers leave. The
result goes between the markers of its precision in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
# The generated text of each precision goes between its own markers, so that a run of one
# precision keeps the other's results and the hand-written reading around them.
MARKERS = {"fp32": "trainer", "bf16": "trainer-bf16"}
TARGET_RATIO = 1.3
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]

MODEL = {"architecture": "llama", "hiddenSize": 256, "numLayers": 4, "numHeads": 4,
         "intermediateSize": 1024, "maxPositionEmbeddings": 256}
SEQUENCE_LENGTH = 128
MICRO_BATCH = 8
LEARNING_RATE = 1e-3
WARMUP_STEPS = 5
WEIGHT_DECAY = 0.01
VOCAB_SIZE = 4000
PROCESSES = 2


def read_pubtator(path: Path) -> list[dict]:
    """Return the documents (title and abstract) of a PubTator file."""
    documents: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] in ("t", "a"):
            documents.setdefault(parts[0], []).append(parts[2])
    return [{"id": pmid, "source": path.name, "text": " ".join(text)}
            for pmid, text in documents.items()]


def build_workspace(data_dir: Path, root: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Write a Corpus output (train/validation shards) and a Tokenizer output under root."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bc5cdr = data_dir / "pubmed" / "bc5cdr"
    train = []
    for path in sorted(bc5cdr.glob("*.PubTator.txt")):
        train.extend(read_pubtator(path))
    validation, train = train[:20], train[20:]
    for split, documents in (("train", train), ("validation", validation)):
        (root / "corpus" / split).mkdir(parents=True)
        lines = "".join(json.dumps(document) + "\n" for document in documents)
        (root / "corpus" / split / "shard-00000.jsonl").write_text(lines, encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([d["text"] for d in train], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<pad>", unk_token="<unk>",
    )
    tokenizer.save_pretrained(str(root / "tokenizer"))


def workspace_inputs(root: Path) -> dict:
    """Return the PretrainJob inputs that build_workspace wrote under root."""
    from lathe_trainer.stage import ResolvedInput

    return {
        "corpus": ResolvedInput(kind="Corpus", name="pubmed", uri=f"file://{root}/corpus",
                                digest="sha256:c"),
        "tokenizer": ResolvedInput(kind="Tokenizer", name="pubmed",
                                   uri=f"file://{root}/tokenizer", digest="sha256:t"),
    }


def lathe_config(root: Path, data_dir: Path, steps: int, compile: bool,
                 precision: str = "fp32") -> Path:
    from lathe.api import KINDS
    from lathe.plans import stage_config

    resource = KINDS["PretrainJob"].model_validate({
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "bench"},
        "spec": {
            "corpusRef": {"name": "pubmed"},
            "tokenizerRef": {"name": "pubmed"},
            "model": MODEL,
            "sequenceLength": SEQUENCE_LENGTH,
            "evalSequences": 16,
            "training": {"maxSteps": steps, "microBatchSize": MICRO_BATCH,
                         "learningRate": LEARNING_RATE, "warmupSteps": WARMUP_STEPS,
                         "weightDecay": WEIGHT_DECAY, "precision": precision,
                         "compile": compile,
                         # Evaluation and checkpoints run only after the last step.
                         "evalInterval": steps, "checkpointInterval": steps},
            "distributed": {"nodes": 1, "procsPerNode": PROCESSES, "backend": "gloo"},
        },
    })
    inputs = workspace_inputs(root)
    output = root / "lathe-out"
    output.mkdir(exist_ok=True)
    config = stage_config(resource, inputs, f"file://{output}", str(data_dir))
    path = root / "lathe-config.json"
    path.write_text(config.model_dump_json())
    return path


def torchrun(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(PROCESSES), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def window_rate(end_times: dict[int, float], steps: int, window: int) -> float:
    """Return input tokens per second over the last `window` steps (all processes)."""
    seconds = end_times[steps] - end_times[steps - window]
    return window * MICRO_BATCH * PROCESSES * SEQUENCE_LENGTH / seconds


# Settings of transformers.Trainer that `--hf-reference NAME` also runs, for reference: the
# column title and the TrainingArguments it changes. At its defaults, Trainer wraps a model
# without gradient checkpointing in DDP with find_unused_parameters=True, which walks the
# autograd graph after every forward pass.
HF_REFERENCES: dict[str, tuple[str, dict[str, Any]]] = {
    "static-ddp": ("HF Trainer, `ddp_find_unused_parameters=False`",
                   {"ddp_find_unused_parameters": False}),
    "compile": ("HF Trainer, `torch_compile=True`", {"torch_compile": True}),
}


# A NamedTuple rather than a dataclass: benchmarks/gpu_mfu.py and the unit tests load this file
# as a module that is not in sys.modules, where a dataclass cannot resolve its annotations.
class Row(NamedTuple):
    """One repeat: tokens per second of each run, the load before it and the final losses."""

    lathe: float
    compiled: float | None
    hf: float
    references: dict[str, float]
    load: tuple[float, ...]
    lathe_loss: float
    hf_loss: float


# Steps that the reported training loss is the mean of: Hugging Face logs the mean loss of
# every LOSS_STEPS steps (logging_steps), and the Lathe side takes its last LOSS_STEPS steps.
LOSS_STEPS = 10


def run_lathe(root: Path, data_dir: Path, steps: int, window: int, compile: bool,
              precision: str = "fp32") -> tuple[float, float]:
    """Return the tokens per second of the Lathe stage and its mean loss over the last
    LOSS_STEPS steps."""
    config = lathe_config(root, data_dir, steps, compile, precision)
    torchrun(["-m", "lathe_trainer", "pretrain", "--config", str(config)])
    end_times, losses = {}, {}
    # Each run appends to the same progress file, so the records of this run come last.
    for line in (root / "lathe-out" / "progress.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "gradNorm" in record:
            end_times[record["completed"]] = record["time"]
            losses[record["completed"]] = record["loss"]
    last = [losses[step] for step in range(steps - LOSS_STEPS + 1, steps + 1)]
    return window_rate(end_times, steps, window), sum(last) / len(last)


def run_hugging_face(root: Path, steps: int, window: int, precision: str = "fp32",
                     reference: str | None = None) -> tuple[float, float]:
    """Return the tokens per second of transformers.Trainer and the mean loss it logged for
    the last LOSS_STEPS steps, at its defaults or with the settings of HF_REFERENCES[reference]."""
    torchrun([str(Path(__file__).resolve()), "--hf-worker", str(root), "--steps", str(steps),
              "--precision", precision, *(["--hf-reference", reference] if reference else [])])
    written = json.loads((root / "hf-steps.json").read_text())
    end_times = {int(step): seconds for step, seconds in written["endTimes"].items()}
    return window_rate(end_times, steps, window), written["loss"]


def hf_worker(root: Path, steps: int, precision: str = "fp32",
              reference: str | None = None) -> None:
    """Train with transformers.Trainer on the packed Lathe sequences (one torchrun process),
    at its defaults or with the settings of HF_REFERENCES[reference]."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for line in (root / "corpus" / "train" / "shard-00000.jsonl").read_text().splitlines():
        ids.extend(tokenizer(json.loads(line)["text"])["input_ids"] + [eos])
    count = len(ids) // SEQUENCE_LENGTH
    sequences = torch.tensor(ids[: count * SEQUENCE_LENGTH]).view(count, SEQUENCE_LENGTH)
    dataset = [{"input_ids": row, "labels": row} for row in sequences]

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=MODEL["hiddenSize"],
        num_hidden_layers=MODEL["numLayers"], num_attention_heads=MODEL["numHeads"],
        intermediate_size=MODEL["intermediateSize"],
        max_position_embeddings=MODEL["maxPositionEmbeddings"],
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    end_times: dict[int, float] = {}
    losses: dict[int, float] = {}

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            end_times[state.global_step] = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    arguments = TrainingArguments(
        output_dir=str(root / "hf-out"), max_steps=steps,
        per_device_train_batch_size=MICRO_BATCH, learning_rate=LEARNING_RATE,
        warmup_steps=WARMUP_STEPS, weight_decay=WEIGHT_DECAY, adam_beta2=0.95,
        lr_scheduler_type="cosine", max_grad_norm=1.0, seed=0, use_cpu=True,
        ddp_backend="gloo", save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=LOSS_STEPS, dataloader_num_workers=0, remove_unused_columns=False,
        bf16=precision == "bf16", **(HF_REFERENCES[reference][1] if reference else {}),
    )
    Trainer(model=model, args=arguments, train_dataset=dataset,
            callbacks=[StepTimes()]).train()
    if int(os.environ.get("RANK", "0")) == 0:
        (root / "hf-steps.json").write_text(json.dumps({"endTimes": end_times,
                                                        "loss": losses[steps]}))


def matmul_shapes() -> list[tuple[int, int, int, int]]:
    """Return (batch, m, k, n) of every matrix product in one training step of one process.

    Each Linear of `in` to `out` features over T tokens runs three products. Forward: T x in
    by in x out. Backward: the input gradient, T x out by out x in, and the weight gradient,
    out x T by T x in. Attention runs QK^T and the product with V per head,
    forward and twice each backward, over the whole sequence (no causal saving is counted).
    """
    tokens = MICRO_BATCH * SEQUENCE_LENGTH
    hidden, mlp = MODEL["hiddenSize"], MODEL["intermediateSize"]
    heads = MODEL["numHeads"]
    head = hidden // heads
    linears = [(hidden, hidden)] * 4 + [(hidden, mlp)] * 2 + [(mlp, hidden)]
    shapes = []
    for _ in range(MODEL["numLayers"]):
        for inputs, outputs in linears:
            shapes += [(1, tokens, inputs, outputs), (1, tokens, outputs, inputs),
                       (1, outputs, tokens, inputs)]
        batch = MICRO_BATCH * heads
        length = SEQUENCE_LENGTH
        # scores = Q K^T and its two gradients; output = P V and its two gradients.
        shapes += [(batch, length, head, length)] * 3 + [(batch, length, length, head)] * 3
    shapes += [(1, tokens, hidden, VOCAB_SIZE), (1, tokens, VOCAB_SIZE, hidden),
               (1, VOCAB_SIZE, tokens, hidden)]
    return shapes


def matmul_worker(seconds: float, precision: str = "fp32") -> None:
    """Print the tokens per second of one process that runs only a step's matrix products,
    in float32, or in bfloat16 as autocast runs them for bf16."""
    import torch

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    operands = [(torch.randn(b, m, k, dtype=dtype), torch.randn(b, k, n, dtype=dtype))
                for b, m, k, n in matmul_shapes()]

    def step() -> None:
        for left, right in operands:
            torch.bmm(left, right)

    step()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - started
    flops = sum(2 * b * m * k * n for b, m, k, n in matmul_shapes())
    print(json.dumps({"tokensPerSecond": steps * MICRO_BATCH * SEQUENCE_LENGTH / elapsed,
                      "gflops": steps * flops / elapsed / 1e9}))


def matmul_ceiling(seconds: float = 20.0, precision: str = "fp32") -> tuple[float, float]:
    """Return (tokens/s over all processes, GFLOP/s per process) of PROCESSES processes that
    run only the matrix products of the training step, one thread each, at the same time.

    No trainer that computes the same model at that precision through PyTorch's CPU kernels
    can pass this rate, since it leaves out everything but the products: normalization,
    activations, the loss, the optimizer and the all-reduce.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--matmul-worker",
               str(seconds), "--precision", precision]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(PROCESSES)]
    outputs = [worker.communicate()[0] for worker in workers]
    if any(worker.returncode for worker in workers):
        raise RuntimeError(f"{' '.join(command)} failed; its error output is above.")
    results = [json.loads(output) for output in outputs]
    return (sum(result["tokensPerSecond"] for result in results),
            sum(result["gflops"] for result in results) / PROCESSES)


def write_doc(text: str, precision: str = "fp32") -> None:
    """Replace the text between the markers of `precision`, keeping the rest of the page."""
    begin = f"<!-- {MARKERS[precision]}:begin -->"
    end = f"<!-- {MARKERS[precision]}:end -->"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    document = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    if begin not in document:
        document = document.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    DOC.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", document))


def cpu_model() -> str:
    """Return the processor's model name and which bf16 matrix instructions it has, which
    decide the bf16 matrix-product rate: 937 GFLOP/s per process with AMX (docs/benchmarks.md),
    against an estimated 200 or so on an AMD EPYC with AVX-512 bf16 alone."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "processor unknown"
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    present = set(flags.group(1).split()) if flags else set()
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in present]
    return (f"{model.group(1).strip() if model else 'processor unknown'}, bf16 matrix "
            f"instructions: {', '.join(bf16) or 'none'}")


def report(
    rows: list[Row], steps: int, window: int,
    ceiling: tuple[float, float] | None = None, precision: str = "fp32",
) -> str:
    best_lathe = max(row.lathe for row in rows)
    best_hf = max(row.hf for row in rows)
    references = [name for name in HF_REFERENCES if any(name in row.references for row in rows)]
    ratio = best_lathe / best_hf
    verdict = "pass" if ratio >= TARGET_RATIO else "miss"
    title = "### fp32"
    command = "python benchmarks/trainer.py"
    if precision == "bf16":
        command += " --precision bf16"
        title = "### bf16 autocast"
    if any(row.compiled is not None for row in rows):
        command += " --compile"
    command += "".join(f" --hf-reference {name}" for name in references)
    command += f" --repeats {len(rows)}"
    lines = [
        title,
        "",
        f"`{command}` trains the same tiny Llama on the same packed BC5CDR "
        "sequences in several runs, each of 2 CPU processes under torchrun (gloo, DDP, "
        f"{precision}). Lathe's PretrainJob stage runs eager, and with `--compile` once more "
        "with `spec.training.compile: true`. Hugging Face `transformers.Trainer` runs at its "
        "defaults, and once more with each `--hf-reference` setting. The target compares "
        "Lathe with HF Trainer at its defaults. The rates "
        f"are input tokens per second over all processes during the last {window} of {steps} "
        "steps, from wall-clock step-end times, so start-up and warm-up are excluded. The "
        f"loss is each trainer's mean training loss over its last {LOSS_STEPS} steps, which "
        "shows that both trained the same model as far.",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"{platform.python_implementation()} {platform.python_version()} (the load average "
        "before each run is in the table)",
        f"- Model: Llama, hidden {MODEL['hiddenSize']}, {MODEL['numLayers']} layers, "
        f"{MODEL['numHeads']} heads, MLP {MODEL['intermediateSize']}, vocabulary {VOCAB_SIZE}",
        f"- Batch: {MICRO_BATCH} sequences of {SEQUENCE_LENGTH} tokens per process, "
        f"{PROCESSES} processes, no accumulation; {steps} steps",
        "",
        "| Run | Load average (1 min) before | Lathe tokens/s | Lathe compiled tokens/s | "
        "HF Trainer tokens/s | "
        + "".join(f"{HF_REFERENCES[name][0]}, tokens/s | " for name in references)
        + f"Ratio Lathe / HF | Loss of the last {LOSS_STEPS} steps, Lathe / HF |",
        "|---|---|---|---|---|" + "---|" * len(references) + "---|---|",
    ]

    def rate(value: float | None) -> str:
        return "not run" if value is None else f"{value:.0f}"

    for index, row in enumerate(rows, 1):
        reference_cells = "".join(f"{rate(row.references.get(name))} | " for name in references)
        lines.append(f"| {index} | {row.load[0]:.2f} | {row.lathe:.0f} | {rate(row.compiled)} | "
                     f"{row.hf:.0f} | {reference_cells}{row.lathe / row.hf:.2f} | "
                     f"{row.lathe_loss:.2f} / {row.hf_loss:.2f} |")
    # Three decimals, so that a ratio just below the target does not print as the target.
    lines += [
        "",
        f"Best of each: Lathe {best_lathe:.0f} tokens/s, HF Trainer at its defaults "
        f"{best_hf:.0f} tokens/s, ratio {ratio:.3f} against a target of {TARGET_RATIO}: "
        f"**{verdict}**.",
    ]
    compiled_rates = [row.compiled for row in rows if row.compiled is not None]
    if compiled_rates:
        best_compiled = max(compiled_rates)
        compiled_verdict = "pass" if best_compiled / best_hf >= TARGET_RATIO else "miss"
        lines[-1] += (
            f" With `spec.training.compile: true`, Lathe reached {best_compiled:.0f} tokens/s, "
            f"ratio {best_compiled / best_hf:.3f}: **{compiled_verdict}**."
        )
    for name in references:
        best = max(row.references[name] for row in rows if name in row.references)
        lines[-1] += (f" {HF_REFERENCES[name][0]} reached {best:.0f} tokens/s; Lathe is "
                      f"{best_lathe / best:.3f} times that")
        lines[-1] += (f", compiled Lathe {max(compiled_rates) / best:.3f} times."
                      if compiled_rates else ".")
    if ceiling is not None:
        bound, gflops = ceiling
        flops = sum(2 * b * m * k * n for b, m, k, n in matmul_shapes())
        per_token = flops / (MICRO_BATCH * SEQUENCE_LENGTH)
        lines += [
            "",
            f"Matrix products alone: {PROCESSES} processes that run only the "
            f"{len(matmul_shapes())} matrix products of a training step "
            f"({per_token / 1e6:.1f} MFLOP per token), one thread each, at the same time, "
            f"reach {bound:.0f} tokens/s ({gflops:.0f} GFLOP/s per process). That is the "
            f"most any {precision} trainer of this model can reach through PyTorch's CPU "
            "kernels: "
            f"{bound / best_hf:.2f} times HF Trainer's rate. Lathe reaches "
            f"{best_lathe / bound:.0%} of it, HF Trainer {best_hf / bound:.0%}.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="Directory that contains pubmed/bc5cdr.")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="Reuse this directory's corpus/ and tokenizer/ instead of building "
                        "them in a temporary directory.")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run.")
    parser.add_argument("--window", type=int, default=20,
                        help="Last steps that the rates are measured over.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs of each trainer; the best rate of each is compared.")
    parser.add_argument("--compile", action="store_true",
                        help="Also run the Lathe stage with spec.training.compile: true.")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="Precision of both trainers: fp32, or bf16 autocast.")
    parser.add_argument("--hf-reference", action="append", choices=sorted(HF_REFERENCES),
                        default=[],
                        help="Also run HF Trainer with these settings, for reference (may be "
                             "given more than once): static-ddp sets "
                             "ddp_find_unused_parameters=False, compile sets torch_compile=True. "
                             "The target compares against its defaults.")
    parser.add_argument("--no-doc", action="store_true", help="Do not update the docs page.")
    parser.add_argument("--hf-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--matmul-worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.hf_worker:
        hf_worker(args.hf_worker, args.steps, args.precision,
                  args.hf_reference[0] if args.hf_reference else None)
        return
    if args.matmul_worker:
        matmul_worker(args.matmul_worker, args.precision)
        return
    if args.steps % LOSS_STEPS or not 0 < args.window < args.steps:
        parser.error(f"--steps {args.steps} and --window {args.window} are invalid: --steps must "
                     f"be a multiple of {LOSS_STEPS}, the steps each reported loss covers, and "
                     "--window between 1 and --steps - 1.")

    rows = []
    with tempfile.TemporaryDirectory(prefix="lathe-trainer-bench-") as temporary:
        root = args.workspace or Path(temporary)
        if not (root / "tokenizer" / "tokenizer.json").is_file():
            build_workspace(args.data_dir, root)
        for _ in range(args.repeats):
            load = os.getloadavg()
            lathe, lathe_loss = run_lathe(root, args.data_dir, args.steps, args.window,
                                          compile=False, precision=args.precision)
            compiled = None
            if args.compile:
                compiled, _ = run_lathe(root, args.data_dir, args.steps, args.window,
                                        compile=True, precision=args.precision)
            hf, hf_loss = run_hugging_face(root, args.steps, args.window, args.precision)
            references = {name: run_hugging_face(root, args.steps, args.window,
                                                 args.precision, name)[0]
                          for name in dict.fromkeys(args.hf_reference)}
            print(f"Lathe {lathe:.0f} tokens/s (compiled {compiled}, loss {lathe_loss:.3f}), "
                  f"HF Trainer {hf:.0f} tokens/s (loss {hf_loss:.3f}; with other settings "
                  f"{references}), ratio {lathe / hf:.2f} (load average {load[0]:.2f}).",
                  flush=True)
            rows.append(Row(lathe, compiled, hf, references, load, lathe_loss, hf_loss))

    ceiling = matmul_ceiling(precision=args.precision)
    print(f"Matrix products alone: {ceiling[0]:.0f} tokens/s ({ceiling[1]:.0f} GFLOP/s per "
          "process).", flush=True)
    text = report(rows, args.steps, args.window, ceiling, args.precision)
    print(text)
    if not args.no_doc:
        write_doc(text, args.precision)


if __name__ == "__main__":
    main()
