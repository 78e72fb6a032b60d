"""Measure the peak memory of loading a PretrainJob checkpoint from a local disk and from S3.

Usage: `python benchmarks/checkpoint_memory.py [--size 5000] [--no-s3]`. It saves a checkpoint
of a `size` x `size` linear layer with its AdamW state through
`lathe_trainer.training.checkpoint`. It does so on a local disk and on a real S3 store:
SeaweedFS on loopback, built by scripts/tools/seaweedfs.sh. Each is then loaded in fresh
processes, once with `checkpoint.load`, and once by reading each file into memory and loading
it from those bytes, the baseline. `checkpoint.load` downloads an object to a local file
first, then memory-maps the weights and reads the optimizer state. Each process prints its
peak resident set size before and after the load. The result goes between the markers in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
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


def load(root: str, method: str) -> None:
    import torch

    from lathe_trainer.training import checkpoint, storage

    path = checkpoint.latest_checkpoint(root)
    # Resolving a store imports its client, which is not part of the load.
    filesystem, base = storage.resolve(path)
    before = peak_mib()
    if method == "checkpoint.load":
        loaded = checkpoint.load(path)
    else:
        loaded = [torch.load(io.BytesIO(filesystem.cat_file(f"{base}/{name}")),
                             map_location="cpu", weights_only=True) for name in FILES]
    after = peak_mib()
    mebibytes = sum(filesystem.size(f"{base}/{name}") for name in FILES) / 2**20
    print(json.dumps({"before": before, "after": after, "loaded": loaded is not None,
                      "mebibytes": mebibytes}))


def s3_store(work_dir: Path):
    """Start SeaweedFS's S3 gateway on loopback, as the s3:// tests do; return the store."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_store import S3Store, build

    store = S3Store(build(), work_dir)
    store.start()
    return store


def run_worker(root: str, method: str, size: int, environment: dict) -> str:
    # Every step runs in its own process, because Linux keeps a process's peak resident set
    # size across exec: a child of a process that held the model would start with it.
    return subprocess.run(
        [sys.executable, __file__, "--size", str(size), "--worker", root, method],
        capture_output=True, text=True, check=True, env=environment,
    ).stdout.strip()


def measure(where: str, root: str, size: int, environment: dict) -> tuple[list[str], float]:
    """Save a checkpoint under `root`; return the table rows of its two loads and its MiB."""
    run_worker(root, "save", size, environment)
    rows = []
    for method in ("checkpoint.load", "read whole"):
        result = json.loads(run_worker(root, method, size, environment).splitlines()[-1])
        rows.append(f"| {where} | {method} | {result['before']} | {result['after']} | "
                    f"{result['after'] - result['before']} |")
        megabytes = result["mebibytes"]
    return rows, megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--no-s3", action="store_true",
                        help="Measure the local disk alone, without starting SeaweedFS.")
    parser.add_argument("--worker", nargs=2, metavar=("ROOT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        root, method = args.worker
        if method == "save":
            save(root, args.size)
        else:
            load(root, method)
        return
    with tempfile.TemporaryDirectory() as directory:
        roots = {"local disk": str(Path(directory) / "checkpoints")}
        store = None
        if not args.no_s3:
            store = s3_store(Path(directory) / "s3")
            roots["S3"] = f"s3://lathe/benchmark-{os.getpid()}/checkpoints"
        environment = {**os.environ, **(store.env if store else {})}
        try:
            rows = []
            for where, root in roots.items():
                measured, megabytes = measure(where, root, args.size, environment)
                rows.extend(measured)
        finally:
            if store:
                store.stop()
    text = "\n".join([
        BEGIN,
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: a checkpoint of "
        f"{megabytes:.0f} MiB (a {args.size} x {args.size} linear layer with its AdamW state).",
        "",
        "| store | load | peak RSS before, MiB | peak RSS after, MiB | added, MiB |",
        "|---|---|---:|---:|---:|",
        *rows,
        END,
    ])
    print(text)
    doc = DOC.read_text()
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + text + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n## Checkpoint load memory\n\n" + text + "\n"
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
