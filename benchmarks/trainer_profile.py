"""Trace where a training step of the trainer benchmark spends its time, with torch.profiler.

Usage: `python benchmarks/trainer_profile.py [--precision fp32|bf16] [--compile]
[--attention lathe|sdpa] [--steps 5]`. It prints its results and writes no file. The model, batch and
processes are those of benchmarks/trainer.py: a Llama with hidden size 256, 4 layers, MLP 1024
and vocabulary 4000, 8 random sequences of 128 tokens per process, 2 processes under torchrun
(gloo, DDP). Each step is the PretrainJob stage's: forward under autocast for bf16, the token
loss sum (compiled with `--compile`, as the stage compiles it), backward, gradient clipping and
fused AdamW. `--attention sdpa` keeps transformers' SDPA attention where the stage would
switch bf16 runs to `lathe_trainer.training.attention`.

After 8 warm-up steps, rank 0 prints the tokens per second of 10 steps over both processes.
Then it prints the operators with the most self CPU time over `--steps` profiled steps, and
the milliseconds per step of the matrix products (aten::mm, aten::bmm, aten::addmm).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer import MICRO_BATCH, MODEL, PROCESSES, SEQUENCE_LENGTH, VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 8
TIMED_STEPS = 10
MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm")


def worker(arguments: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lathe_trainer.training import attention
    from lathe_trainer.training.loss import loss_function
    from lathe_trainer.training.precision import autocast

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=MODEL["hiddenSize"], num_hidden_layers=MODEL["numLayers"],
                         num_attention_heads=MODEL["numHeads"],
                         num_key_value_heads=MODEL["numHeads"],
                         intermediate_size=MODEL["intermediateSize"], vocab_size=VOCAB_SIZE,
                         max_position_embeddings=MODEL["maxPositionEmbeddings"])
    model = AutoModelForCausalLM.from_config(config)
    if arguments.precision != "fp32" and arguments.attention == "lathe":
        attention.use_cpu_attention(model)
    if arguments.compile:
        model.compile()
    train_module = DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    token_loss = loss_function(arguments.compile)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(rank)
    sequences = torch.randint(0, VOCAB_SIZE, (MICRO_BATCH, SEQUENCE_LENGTH), generator=generator)
    tokens = MICRO_BATCH * (SEQUENCE_LENGTH - 1) * PROCESSES

    def step() -> None:
        with autocast(device, arguments.precision):
            logits = train_module(input_ids=sequences).logits
        (token_loss(logits, sequences, True) * (PROCESSES / tokens)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP_STEPS):
        step()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - started) / TIMED_STEPS
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(arguments.steps):
            step()
    if rank == 0:
        rate = MICRO_BATCH * SEQUENCE_LENGTH * PROCESSES / seconds
        print(f"{arguments.precision}, compile {arguments.compile}, attention "
              f"{model.config._attn_implementation}: {seconds * 1000:.1f} ms per step, "
              f"{rate:.0f} tokens/s over {PROCESSES} processes.")
        averages = profiler.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20))
        total = sum(event.self_cpu_time_total for event in averages) / arguments.steps / 1000
        products = sum(event.self_cpu_time_total for event in averages
                       if event.key in MATRIX_PRODUCTS) / arguments.steps / 1000
        print(f"Profiled step: {total:.1f} ms of CPU time, of which matrix products "
              f"{products:.1f} ms ({products / total:.0%}).")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model and the loss, as spec.training.compile does")
    parser.add_argument("--attention", choices=("lathe", "sdpa"), default="lathe",
                        help="the stage's attention choice for bf16 (lathe), or plain SDPA")
    parser.add_argument("--steps", type=int, default=5, help="steps to profile")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(PROCESSES), __file__, "--worker",
               *sys.argv[1:]]
    paths = [str(REPO / "operator"), str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    raise SystemExit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
