"""The trainer benchmark's matrix-product ceiling counts the products of the real model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lathe_trainer.training.flops import flops_per_token
from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trainer.py"


def _benchmark():
    return load_script(SCRIPT)


def test_matmul_shapes_match_the_benchmark_model():
    """Every Linear of the Llama the benchmark trains runs three products a step, and the
    total agrees with the FLOPs per token the trainer reports for MFU."""
    bench = _benchmark()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=bench.VOCAB_SIZE, hidden_size=bench.MODEL["hiddenSize"],
        num_hidden_layers=bench.MODEL["numLayers"], num_attention_heads=bench.MODEL["numHeads"],
        intermediate_size=bench.MODEL["intermediateSize"],
        max_position_embeddings=bench.MODEL["maxPositionEmbeddings"],
    ))
    linear_weights = sum(module.weight.numel() for module in model.modules()
                         if isinstance(module, torch.nn.Linear))
    tokens = bench.MICRO_BATCH * bench.SEQUENCE_LENGTH
    shapes = bench.matmul_shapes()
    flops = sum(2 * b * m * k * n for b, m, k, n in shapes)

    attention = 12 * bench.MODEL["numLayers"] * bench.MODEL["hiddenSize"] * bench.SEQUENCE_LENGTH
    assert flops == tokens * (6 * linear_weights + attention)
    assert flops / tokens == flops_per_token(
        linear_weights, bench.MODEL["numLayers"], bench.MODEL["hiddenSize"],
        bench.SEQUENCE_LENGTH)
    assert len(shapes) == 3 * (7 * bench.MODEL["numLayers"] + 1) + 6 * bench.MODEL["numLayers"]


def test_doc_keeps_other_precision(tmp_path, monkeypatch):
    """A bf16 run rewrites only its own block of the page, so the fp32 results and the text
    between the blocks stay."""
    bench = _benchmark()
    page = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bench, "DOC", page)
    page.write_text("# Benchmarks\n\n<!-- trainer:begin -->\nfp32 table\n<!-- trainer:end -->\n"
                    "Reading of the fp32 runs.\n")

    bench.write_doc("bf16 table", "bf16")
    bench.write_doc("new bf16 table", "bf16")

    text = page.read_text()
    assert "fp32 table" in text
    assert "Reading of the fp32 runs." in text
    assert "<!-- trainer-bf16:begin -->\nnew bf16 table\n<!-- trainer-bf16:end -->" in text
    assert "\nbf16 table" not in text


def test_report_compares_against_hf_defaults():
    """The verdicts compare Lathe, eager and compiled, with HF Trainer at its defaults. Each
    reference setting of HF Trainer gets a column, which shows "not run" for a repeat without it."""
    bench = _benchmark()
    load = (0.5, 0.5, 0.5)
    rows = [bench.Row(2000.0, 2640.0, 2000.0, {"static-ddp": 2400.0}, load, 7.15, 7.21),
            bench.Row(1990.0, 2600.0, 1900.0, {}, load, 7.16, 7.22)]

    text = bench.report(rows, 40, 20, precision="bf16")

    assert "`python benchmarks/trainer.py --precision bf16 --compile --hf-reference static-ddp " \
        "--repeats 2`" in text
    assert "| HF Trainer, `ddp_find_unused_parameters=False`, tokens/s | Ratio" in text
    assert "`torch_compile=True`" not in text
    assert "| 1 | 0.50 | 2000 | 2640 | 2000 | 2400 | 1.00 | 7.15 / 7.21 |" in text
    assert "| 2 | 0.50 | 1990 | 2600 | 1900 | not run | 1.05 | 7.16 / 7.22 |" in text
    assert "ratio 1.000 against a target of 1.3: **miss**" in text
    assert "Lathe reached 2640 tokens/s, ratio 1.320: **pass**" in text
    assert ("`ddp_find_unused_parameters=False` reached 2400 tokens/s; Lathe is 0.833 times "
            "that, compiled Lathe 1.100 times.") in text
