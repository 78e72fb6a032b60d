"""Export a token classifier of more than 2 GiB through the ModelDeployment export stage.

Usage: `python benchmarks/export_large.py [--hidden 1536] [--layers 16] [--keep DIR]`.

A single ONNX protobuf file cannot exceed 2 GiB, so larger models must keep their weights in
an external data file. The unit tests force that path on tiny models; this script runs it at
the size where it is needed. It writes a random-weight Llama token classifier in the FineTune
output format: 606M parameters, 2.26 GiB in fp32, at the defaults. Then it runs the export
stage of the PubMed example's ModelDeployment on it: ONNX export, the ONNX Runtime check
against PyTorch at the example's lengths, INT8 quantization and the Triton model repository.
It prints the time, the peak resident memory of this process and the files written. With
`--serve` it then starts the local tritonserver on the model repository, sends it the sample
sentence of `lathe run` and compares the entities with those of the PyTorch model. It needs
about 12 GB of free memory (16 GB with `--serve`) and 10 GB of disk. Random weights are enough
to compare the runtimes with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForTokenClassification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_ner_model import LABELS, build_tokenizer  # noqa: E402

from lathe.api import KINDS  # noqa: E402
from lathe.plans import stage_config  # noqa: E402
from lathe_trainer.export import stage  # noqa: E402
from lathe_trainer.stage import ResolvedInput  # noqa: E402

EXAMPLE = REPO / "examples" / "pubmed" / "05-deployment.yaml"


def write_model(data_dir: Path, output: Path, hidden: int, layers: int) -> int:
    """Write a random Llama token classifier with a PubMed tokenizer; return its parameter count."""
    tokenizer = build_tokenizer(data_dir, output)
    id2label = dict(enumerate(LABELS))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128, max_position_embeddings=512,
        id2label=id2label, label2id={label: index for index, label in id2label.items()},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, lathe_label_subtoken="last",
    )
    torch.manual_seed(0)
    model = LlamaForTokenClassification(config)
    # Scale the projections into the residual stream down, as GPT-2 does by 1/sqrt(2 x layers)
    # for deep models, so that activations stay in a moderate range over all the layers.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.mul_(0.25)
    model.save_pretrained(output)
    return sum(parameter.numel() for parameter in model.parameters())


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def serve(work: Path) -> dict:
    """Start Triton on the exported repository and compare its entities with PyTorch's."""
    from lathe.cli import DEFAULT_SAMPLE
    from lathe_trainer.serving import client, local_server, reference

    started = time.monotonic()
    with local_server.start_triton(work / "export" / "model_repository", work / "triton",
                                   ready_timeout_s=1200) as server:
        ready = time.monotonic() - started
        served = client.infer_entities(server.http_url, "pubmed_ner", [DEFAULT_SAMPLE])
    expected = reference.predict_entities(work / "finetune" / "model", [DEFAULT_SAMPLE])
    return {"tritonReadySeconds": round(ready, 1), "tritonEntities": len(served[0]),
            "tritonMatchesPytorch": served == expected}


def run(data_dir: Path, work: Path, hidden: int, layers: int) -> dict:
    model_root = work / "finetune"
    started = time.monotonic()
    parameters = write_model(data_dir, model_root / "model", hidden, layers)
    written = time.monotonic() - started
    print(f"Wrote a model of {parameters / 1e6:.0f}M parameters "
          f"({4 * parameters / 2**30:.2f} GiB in fp32) in {written:.0f} s.", flush=True)

    document = yaml.safe_load(EXAMPLE.read_text())
    deployment = KINDS["ModelDeployment"].model_validate(document)
    inputs = {"model": ResolvedInput(kind="FineTune", name="large", uri=f"file://{model_root}",
                                     digest="sha256:large")}
    output = work / "export"
    output.mkdir()
    config = stage_config(deployment, inputs, f"file://{output}", str(data_dir))
    started = time.monotonic()
    metrics = stage.run(config, resume=False)
    seconds = time.monotonic() - started
    files = {path.relative_to(output).as_posix(): path.stat().st_size
             for path in sorted(output.rglob("*")) if path.is_file()
             and path.stat().st_size > 2**20}
    return {
        "parameters": parameters,
        "exportSeconds": round(seconds, 1),
        "peakRssGiB": round(peak_rss_gib(), 2),
        "files": files,
        "metrics": metrics,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536, help="hidden size (multiple of 128)")
    parser.add_argument("--layers", type=int, default=16, help="number of decoder layers")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data directory (default: ../shared/data)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write into this folder and keep it (default: a temporary folder)")
    parser.add_argument("--serve", action="store_true",
                        help="also serve the export through Triton and compare its entities with PyTorch's")
    args = parser.parse_args()
    os.environ.setdefault("LATHE_DATA_DIR", str(args.data_dir.resolve()))
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}.", flush=True)
    with tempfile.TemporaryDirectory(prefix="lathe-export-large-") as temporary:
        work = Path(temporary)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=False)
            work = args.keep
        result = run(args.data_dir.resolve(), work, args.hidden, args.layers)
        if args.serve:
            result.update(serve(work))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
