"""Time PyTorch's CPU attention in bf16 and fp16 against float32, by sequence length.

Usage: `python benchmarks/attention.py [--repeats 5] [--no-doc]`. For each sequence length it
runs causal `scaled_dot_product_attention`, forward and backward, on one thread, as each
process of benchmarks/trainer.py runs. The heads are those of that benchmark's model (4 heads
of 64). A call takes as many whole sequences as fit in 1,024 tokens (8 of 128 tokens), and at
least one. Each reduced type runs twice: as is, and with query, key and value cast to float32
and the output cast back, which is what `lathe_trainer.training.attention` does below its
FLOAT32_BELOW_TOKENS. The median of `--repeats` timed calls, after two warm-up calls, is
reported. The table goes between the attention markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- attention:begin -->"
END = "<!-- attention:end -->"
LENGTHS = (64, 128, 160, 191, 192, 208, 224, 240, 256, 512, 1024, 2048)
# A reduced type counts as slower when it takes this many times float32's time or more.
SLOWER_RATIO = 1.05
REDUCED_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

sys.path.insert(0, str(REPO / "trainer"))
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "benchmarks"))
from lathe_trainer.training.attention import FLOAT32_BELOW_TOKENS  # noqa: E402
from trainer import MICRO_BATCH, MODEL, SEQUENCE_LENGTH, cpu_model  # noqa: E402

# The head layout and micro-batch of the trainer benchmark's model.
HEADS = MODEL["numHeads"]
HEAD_DIM = MODEL["hiddenSize"] // MODEL["numHeads"]
TOKENS_PER_CALL = MICRO_BATCH * SEQUENCE_LENGTH


def median_ms(call, repeats: int) -> float:
    """Return the median wall-clock milliseconds of `call` after two warm-up calls."""
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def attention_ms(length: int, dtype: torch.dtype, upcast: bool, repeats: int) -> float:
    """Time one forward and backward pass of causal attention over TOKENS_PER_CALL tokens."""
    batch = max(1, TOKENS_PER_CALL // length)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator, dtype=dtype,
                    requires_grad=True)
        for _ in range(3)
    )
    gradient = torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator, dtype=dtype)

    def call() -> None:
        if upcast:
            output = F.scaled_dot_product_attention(
                query.float(), key.float(), value.float(), is_causal=True
            ).to(dtype)
        else:
            output = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        output.backward(gradient)

    return median_ms(call, repeats)


def measure(repeats: int) -> list[dict]:
    rows = []
    for length in LENGTHS:
        row = {"length": length, "batch": max(1, TOKENS_PER_CALL // length)}
        for name, dtype in REDUCED_TYPES.items():
            row[name] = attention_ms(length, dtype, upcast=False, repeats=repeats)
            row[f"{name}-fp32"] = attention_ms(length, dtype, upcast=True, repeats=repeats)
        rows.append(row)
        print(f"{length} tokens: " + ", ".join(
            f"{name} {row[name]:.1f} ms, {name} in float32 {row[f'{name}-fp32']:.1f} ms"
            for name in REDUCED_TYPES
        ), flush=True)
    return rows


def slower_lengths(rows: list[dict], name: str) -> str:
    lengths = [str(row["length"]) for row in rows
               if row[name] >= SLOWER_RATIO * row[f"{name}-fp32"]]
    return ", ".join(lengths) if lengths else "no length"


def threshold(name: str) -> str:
    tokens = FLOAT32_BELOW_TOKENS[REDUCED_TYPES[name]]
    return "at every length" if math.isinf(tokens) else f"below {tokens} tokens"


def report(rows: list[dict], repeats: int) -> str:
    lines = [
        "### Attention kernels on the CPU",
        "",
        f"`python benchmarks/attention.py --repeats {repeats}` times causal "
        "`scaled_dot_product_attention`, forward and backward, on one thread, with "
        f"{HEADS} heads of {HEAD_DIM}. A call takes as many whole sequences as fit in "
        f"{TOKENS_PER_CALL:,} tokens, and at least one. Each reduced type runs as is and cast "
        "to float32 around the kernel. The figures are the median milliseconds of "
        f"{repeats} calls, and the ratio is the reduced type's time over float32's.",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {platform.machine()}, {cpu_model()}, torch {torch.__version__}",
        "",
        "| Sequence length | Sequences per call | bf16 ms | bf16 in float32 ms | bf16 ratio | "
        "fp16 ms | fp16 in float32 ms | fp16 ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [str(row["length"]), str(row["batch"])]
        for name in REDUCED_TYPES:
            reduced, upcast = row[name], row[f"{name}-fp32"]
            cells += [f"{reduced:.1f}", f"{upcast:.1f}", f"{reduced / upcast:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in REDUCED_TYPES:
        lines.append(
            f"{name} took {SLOWER_RATIO} times float32's time or more at "
            f"{slower_lengths(rows, name)} tokens. Under {name} autocast on the CPU, the "
            f"PretrainJob stage runs attention in float32 {threshold(name)} "
            "(`lathe_trainer.training.attention.FLOAT32_BELOW_TOKENS`)."
        )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def write_doc(text: str) -> None:
    document = DOC.read_text(encoding="utf-8")
    if BEGIN not in document:
        document = document.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per measurement, after two warm-up calls")
    parser.add_argument("--no-doc", action="store_true",
                        help="print the table without writing docs/benchmarks.md")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    text = report(measure(arguments.repeats), arguments.repeats)
    print(text)
    if not arguments.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
