"""Measure the peak memory of loading a PretrainJob checkpoint, memory-mapped and read whole.

Usage: `python benchmarks/checkpoint_memory.py [--size 5000]`. It saves a checkpoint of a
`size` x `size` linear layer with its AdamW state through `lathe_trainer.training.checkpoint`,
then loads it in two fresh processes: once with `checkpoint.load`, which memory-maps local
files, and once by reading each file into memory and loading it from those bytes, as `load`
does for an object store. Each process prints its peak resident set size before and after the
load. The result goes between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- checkpoint-memory:begin -->", "<!-- checkpoint-memory:end -->"
FILES = ("model.pt", "optimizer.pt", "scheduler.pt", "rng.pt")


def peak_mib() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def save(root: Path, size: int) -> None:
    import torch

    from lathe_trainer.training import checkpoint
    from lathe_trainer.training.distributed import DistributedContext
    from lathe_trainer.training.schedule import build_scheduler

    context = DistributedContext(rank=0, world_size=1, local_rank=0,
                                 device=torch.device("cpu"), backend=None)
    model = torch.nn.Linear(size, size)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, size)).sum().backward()
    optimizer.step()
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=10)
    checkpoint.save(context, root, 1, {}, model, optimizer, scheduler, keep=1)


def load(root: Path, method: str) -> None:
    import torch

    from lathe_trainer.training import checkpoint

    path = checkpoint.latest_checkpoint(root)
    before = peak_mib()
    if method == "mapped":
        loaded = checkpoint.load(path)
    else:
        loaded = [torch.load(io.BytesIO((Path(path) / name).read_bytes()), map_location="cpu",
                             weights_only=True) for name in FILES]
    print(json.dumps({"before": before, "after": peak_mib(), "loaded": loaded is not None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root, method = Path(args.worker[0]), args.worker[1]
        if method == "save":
            save(root, args.size)
        else:
            load(root, method)
        return
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        # Every step runs in its own process, because Linux keeps a process's peak resident
        # set size across exec: a child of a process that held the model would start with it.
        subprocess.run([sys.executable, __file__, "--size", str(args.size), "--worker",
                        str(root), "save"], capture_output=True, check=True)
        megabytes = sum(f.stat().st_size for f in root.rglob("*.pt")) / 2**20
        rows = []
        for method in ("mapped", "read whole"):
            output = subprocess.run(
                [sys.executable, __file__, "--worker", str(root), method],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            result = json.loads(output)
            rows.append(f"| {method} | {result['before']} | {result['after']} | "
                        f"{result['after'] - result['before']} |")
    text = "\n".join([
        BEGIN,
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: a checkpoint of "
        f"{megabytes:.0f} MiB (a {args.size} x {args.size} linear layer with its AdamW state).",
        "",
        "| load | peak RSS before, MiB | peak RSS after, MiB | added, MiB |",
        "|---|---:|---:|---:|",
        *rows,
        END,
    ])
    print(text)
    doc = DOC.read_text()
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Checkpoint load memory\n\n" + (
            "Method: `python benchmarks/checkpoint_memory.py` saves a checkpoint and loads it "
            "in two fresh processes, memory-mapped (`checkpoint.load` on a local file) and read "
            "whole into memory first (as for an `s3://` checkpoint), and reports each process's "
            "peak resident set size. Mapped pages count in the resident set once touched, but "
            "the processes of a node share them.\n\n") + text + "\n"
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
