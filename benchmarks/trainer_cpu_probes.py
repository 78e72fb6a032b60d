"""Probe CPU-side changes that could speed up the training steps of the trainer benchmark.

Usage: `python benchmarks/trainer_cpu_probes.py [--repeats 2]`. It prints the results and
writes nothing. The model and batch are those of benchmarks/trainer.py: a Llama with hidden
size 256, 4 layers, MLP 1024 and vocabulary 4000, on 8 sequences of 128 tokens.

1. Fused projections: one Linear 256->768 against three 256->256 (query, key, value), and one
   256->2048 against two 256->1024 (gate, up), forward and backward on 1,024 tokens. The median
   milliseconds per call are printed.
2. Whole training steps (forward, backward, gradient clipping, fused AdamW) in a fresh process
   per variant: as is, with glibc's allocator kept from returning memory to the system
   (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_), and with denormal floats
   flushed to zero (`torch.set_flush_denormal`). Tokens per second from the median of steps 6
   to 25.
3. The same steps in 2 processes under torchrun with DDP (gloo), as benchmarks/trainer.py runs
   them: DDP's defaults as the stage sets them (gradient_as_bucket_view), buckets of 5 and
   100 MB, static_graph, and one all-reduce of all gradients after the backward pass instead of
   DDP's overlapped buckets. Tokens per second over both processes.

Variants run in turn, `--repeats` times, so a change of machine load affects all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HIDDEN = 256
TOKENS = 1024
STEPS = 25
WARMUP_STEPS = 5
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


def projection_ms(out_features: list[int], calls: int = 200) -> float:
    """Return the median milliseconds of forward and backward through bias-free Linears."""
    import torch

    inputs = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    layers = [torch.nn.Linear(HIDDEN, size, bias=False) for size in out_features]
    times = []
    for call in range(calls + 10):
        started = time.perf_counter()
        outputs = [layer(inputs) for layer in layers]
        sum(output.sum() for output in outputs).backward()
        if call >= 10:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def build_model():
    """Return the benchmark's model, its fused AdamW and one batch of token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4000, hidden_size=HIDDEN, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=1024,
                         max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return model, optimizer, torch.randint(0, config.vocab_size, (8, 128))


def training_steps(flush_denormal: bool) -> float:
    """Return tokens per second of whole training steps of the benchmark's model."""
    import torch

    if flush_denormal:
        torch.set_flush_denormal(True)
    model, optimizer, batch = build_model()

    def backward() -> None:
        model(input_ids=batch, labels=batch).loss.backward()

    return batch.numel() / median_step_seconds(model, optimizer, backward)


def median_step_seconds(model, optimizer, backward) -> float:
    """Return the median seconds of a training step after the warm-up steps. `backward` runs
    the forward and backward passes of one step."""
    import torch

    times = []
    for step in range(STEPS):
        started = time.perf_counter()
        backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def ddp_steps(variant: str) -> float:
    """Return tokens per second over all processes of DDP training steps, on rank 0."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    model, optimizer, batch = build_model()
    options = {"gradient_as_bucket_view": True}
    if variant == "ddp-bucket-5mb":
        options["bucket_cap_mb"] = 5
    if variant == "ddp-bucket-100mb":
        options["bucket_cap_mb"] = 100
    if variant == "ddp-static-graph":
        options["static_graph"] = True
    wrapped = DistributedDataParallel(model, **options)

    def backward() -> None:
        if variant != "ddp-one-all-reduce":
            wrapped(input_ids=batch, labels=batch).loss.backward()
            return
        with wrapped.no_sync():
            wrapped(input_ids=batch, labels=batch).loss.backward()
        gradients = [parameter.grad for parameter in model.parameters()]
        flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset:offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()

    seconds = median_step_seconds(model, optimizer, backward)
    world = dist.get_world_size()
    dist.destroy_process_group()
    return world * batch.numel() / seconds


def worker(variant: str) -> None:
    import torch

    torch.set_num_threads(1)
    if variant.startswith("ddp-"):
        rate = ddp_steps(variant)
        if os.environ.get("RANK", "0") == "0":
            print(f"{variant}: {rate:.0f} tokens/s over 2 processes")
        return
    if variant == "projections":
        print(f"query/key/value: 3 x 256->256 {projection_ms([256] * 3):.2f} ms, "
              f"1 x 256->768 {projection_ms([768]):.2f} ms; "
              f"gate/up: 2 x 256->1024 {projection_ms([1024] * 2):.2f} ms, "
              f"1 x 256->2048 {projection_ms([2048]):.2f} ms")
        return
    rate = training_steps(flush_denormal=variant == "flush-denormal")
    print(f"{variant}: {rate:.0f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="Rounds over all variants.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    variants = [("projections", {}), ("as-is", {}), ("allocator-kept", ALLOCATOR_ENV),
                ("flush-denormal", {})]
    ddp_variants = ["ddp-defaults", "ddp-bucket-5mb", "ddp-bucket-100mb", "ddp-static-graph",
                    "ddp-one-all-reduce"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                "2"]  # fmt: skip
    for _ in range(args.repeats):
        for name, extra_env in variants:
            env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--worker", name], env=env, check=True)
        for name in ddp_variants:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run([*torchrun, __file__, "--worker", name], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
