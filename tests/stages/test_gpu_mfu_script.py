"""benchmarks/gpu_mfu.py on the CPU: the script that measures MFU where a GPU machine is lent.

No GPU runs the project's tests, so these check that the script builds its workspace, runs the
real PretrainJob stage and reads its figures, with no MFU on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_mfu.py"

pytestmark = pytest.mark.slow


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_run_reports_rate_without_mfu(tmp_path, data_dir):
    result_path = tmp_path / "mfu.json"
    result = run_script("--allow-cpu", "--data-dir", str(data_dir), "--preset", "tiny",
                        "--sequence-length", "64", "--micro-batch", "4", "--steps", "6",
                        "--window", "3", "--vocab-size", "2000", "--no-compile",
                        "--json", str(result_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    measured = json.loads(result_path.read_text())
    assert measured["precision"] == "fp32"
    assert measured["mfu"] is None
    assert measured["tokensPerSecond"] > 0
    assert measured["parameterCount"] > 0
    assert measured["flopsPerToken"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_gpu_stops_with_message(data_dir):
    result = run_script("--data-dir", str(data_dir))
    assert result.returncode != 0
    assert "No CUDA device is available" in result.stderr
    assert "--allow-cpu" in result.stderr
