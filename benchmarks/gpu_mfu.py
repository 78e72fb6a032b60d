"""Measure the model FLOPs utilization (MFU) of the PretrainJob trainer on one GPU.

Usage: `python benchmarks/gpu_mfu.py [--data-dir ../shared/data] [--preset 350m]`.

It builds a Corpus output and a byte-level BPE tokenizer (32,000 tokens) from the BC5CDR
PubTator abstracts in a temporary workspace, as benchmarks/trainer.py does. Then it runs the
real PretrainJob stage (`python -m lathe_trainer pretrain`) in one process on one GPU: a Llama
of the `350m` preset (hidden 1024, 24 layers) in bf16 with torch.compile, on packed sequences of
2,048 tokens, 16 to a step. The stage's own figures come from its metrics.json. The rate
compared with the target is measured as in benchmarks/trainer.py. It counts the input tokens
between the end of step `steps - window` and the end of the last step in the stage's
progress.jsonl, so compilation and warm-up are excluded. MFU is that rate times the
stage's FLOPs per token (6 per parameter of the matrix multiplications, plus attention) over
the dense bf16 peak of the GPU (lathe_trainer.training.metrics.PEAK_FLOPS). Target: 50%.

On a machine without CUDA it stops, unless `--allow-cpu` is given, which runs the same steps
in fp32 on the CPU and reports no MFU; the tests use that to check the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_MFU = 0.5


def load_trainer_benchmark():
    """Import benchmarks/trainer.py, whose workspace builder this script shares."""
    spec = importlib.util.spec_from_file_location("trainer_benchmark",
                                                  REPO / "benchmarks" / "trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(root: Path, data_dir: Path, args: argparse.Namespace, on_gpu: bool,
                 inputs: dict) -> Path:
    from lathe.api import KINDS
    from lathe.plans import stage_config

    resource = KINDS["PretrainJob"].model_validate({
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "mfu"},
        "spec": {
            "corpusRef": {"name": "pubmed"},
            "tokenizerRef": {"name": "pubmed"},
            "model": {"architecture": "llama", "preset": args.preset,
                      "maxPositionEmbeddings": max(args.sequence_length, 128)},
            "sequenceLength": args.sequence_length,
            "evalSequences": args.micro_batch,
            "training": {"maxSteps": args.steps, "microBatchSize": args.micro_batch,
                         "learningRate": 3e-4, "warmupSteps": min(10, args.steps - 1),
                         "precision": "bf16" if on_gpu else "fp32",
                         "compile": not args.no_compile,
                         # Evaluation and the checkpoint run only after the last step.
                         "evalInterval": args.steps, "checkpointInterval": args.steps,
                         "keepCheckpoints": 1},
            "distributed": {"nodes": 1, "procsPerNode": 1},
        },
    })
    output = root / "out"
    output.mkdir(exist_ok=True)
    config = stage_config(resource, inputs, f"file://{output}", str(data_dir))
    path = root / "config.json"
    path.write_text(config.model_dump_json())
    return path


def run_stage(config: Path) -> None:
    command = [sys.executable, "-m", "lathe_trainer", "pretrain", "--config", str(config)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=environment, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"The PretrainJob stage failed (exit code {result.returncode}):\n"
                         f"{result.stdout[-6000:]}")


def window_rate(output: Path, steps: int, window: int, tokens_per_step: int) -> float:
    """Return input tokens per second over the last `window` steps, from progress.jsonl."""
    end_times = {}
    for line in (output / "progress.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "gradNorm" in record:
            end_times[record["completed"]] = record["time"]
    seconds = end_times[steps] - end_times[steps - window]
    return window * tokens_per_step / seconds


def measure(args: argparse.Namespace) -> dict:
    import torch

    from lathe_trainer.training.metrics import peak_flops

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        raise SystemExit("No CUDA device is available, and this benchmark measures MFU on a "
                         "GPU. Run it on a GPU machine, or pass --allow-cpu to check the "
                         "script on the CPU without an MFU figure.")
    device_name = torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "CPU"
    trainer_benchmark = load_trainer_benchmark()
    with tempfile.TemporaryDirectory(prefix="lathe-gpu-mfu-") as temporary:
        root = Path(temporary)
        trainer_benchmark.build_workspace(args.data_dir, root, vocab_size=args.vocab_size)
        inputs = trainer_benchmark.workspace_inputs(root)
        run_stage(write_config(root, args.data_dir, args, on_gpu, inputs))
        metrics = json.loads((root / "out" / "metrics.json").read_text())
        rate = window_rate(root / "out", args.steps, args.window,
                           args.micro_batch * args.sequence_length)
    peak = peak_flops(device_name, "bf16") if on_gpu else None
    flops_per_token = metrics["flopsPerToken"]
    return {
        "device": device_name,
        "torch": torch.__version__,
        "preset": args.preset,
        "parameterCount": metrics["parameterCount"],
        "sequenceLength": args.sequence_length,
        "microBatchSize": args.micro_batch,
        "compile": not args.no_compile,
        "precision": "bf16" if on_gpu else "fp32",
        "steps": args.steps,
        "window": args.window,
        "flopsPerToken": flops_per_token,
        "tokensPerSecond": round(rate, 1),
        "peakFlops": peak,
        "mfu": None if peak is None else rate * flops_per_token / peak,
        "stageMfu": metrics.get("mfu"),
        "stageTokensPerSecond": metrics.get("tokensPerSecond"),
        "peakMemoryBytes": metrics.get("peakMemoryBytes"),
        "finalLoss": metrics.get("finalLoss"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="directory that contains pubmed/bc5cdr (default: ../shared/data)")
    parser.add_argument("--preset", default="350m", help="model size preset (default: 350m)")
    parser.add_argument("--sequence-length", type=int, default=2048,
                        help="tokens per packed sequence (default: 2048)")
    parser.add_argument("--micro-batch", type=int, default=16,
                        help="sequences per step (default: 16)")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="vocabulary size of the BPE tokenizer (default: 32000)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument("--window", type=int, default=20,
                        help="last steps that the rate is measured over (default: 20)")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU in fp32 when no GPU is present, without MFU")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if not 0 < args.window < args.steps:
        parser.error(f"--window must be between 1 and --steps - 1 ({args.steps - 1}); "
                     f"it is {args.window}.")

    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["mfu"] is not None:
        verdict = "met" if result["mfu"] >= TARGET_MFU else "missed"
        print(f"MFU {result['mfu']:.1%} on {result['device']} against a target of "
              f"{TARGET_MFU:.0%}: {verdict}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
