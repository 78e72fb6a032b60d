"""The Triton image's Python packages serve the exported model under the image's Python.

images/triton.Dockerfile adds images/triton-requirements.txt to nvcr.io/nvidia/tritonserver
24.10 (Triton 2.51, Python 3.10) with `pip install --target` and PYTHONPATH. No Docker engine
runs here, so this test rebuilds that environment on the machine: the same Triton 2.51 (from
nvidia-pytriton) with its Python 3.10 backend stub, a Python 3.10 interpreter, and the pinned
packages installed the same way. The served entities must equal the in-process PyTorch
model's.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lathe_trainer.serving import client, local_server
from lathe_trainer.serving.reference import predict_entities

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "images" / "triton-requirements.txt"
IMAGE_PYTHON = "3.10"
CACHE = Path(os.environ.get("LATHE_CACHE_DIR", Path.home() / ".cache" / "lathe"))
TEXTS = [
    "Ataxia-telangiectasia (A-T) is a recessive disorder of childhood.",
    "α-thalassaemia and β-thalassemia respond differently to 5 µg/kg of deferoxamine.",
    "",
]

pytestmark = pytest.mark.slow


def find_python(version: str) -> Path | None:
    """Return a Python interpreter of `version`: on PATH, else one that pyenv installed."""
    found = shutil.which(f"python{version}")
    candidates = [Path(found)] if found else []
    candidates += sorted((Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python3"))
    for candidate in candidates:
        result = subprocess.run([str(candidate), "-c", "import sys; print(sys.version[:4])"],
                                capture_output=True, text=True, check=False)  # fmt: skip
        if result.returncode == 0 and result.stdout.strip().startswith(version):
            return candidate
    return None


@pytest.fixture(scope="module")
def image_python() -> local_server.ModelPython:
    """Python 3.10 with the image's packages in a directory on PYTHONPATH, built once per
    requirements file into the cache."""
    python = find_python(IMAGE_PYTHON)
    if python is None:
        pytest.skip(f"No Python {IMAGE_PYTHON} interpreter, the Python of the Triton image, is "
                    f"installed; install python{IMAGE_PYTHON} to run this check.")
    key = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    target = CACHE / f"triton-image-python-{IMAGE_PYTHON}-{key}"
    if not target.is_dir():
        partial = target.with_name(f"{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--quiet", "--target", str(partial),
             "-r", str(REQUIREMENTS)],
            check=True, timeout=900,
        )
        partial.rename(target)
    return local_server.ModelPython.of(python, (str(target),))


def test_image_packages_import_under_image_python(image_python):
    script = "import numpy, onnxruntime, tokenizers; print(onnxruntime.__version__)"
    result = subprocess.run([str(image_python.executable), "-c", script], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": image_python.path[0]},
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.23.2"
    assert image_python.version == IMAGE_PYTHON != f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_image_environment_serves_like_in_process(image_python, export_output,
                                                  tmp_path):  # fmt: skip
    output, model_dir = export_output
    with local_server.start_triton(output / "model_repository", tmp_path / "triton",
                                   python=image_python) as server:  # fmt: skip
        served = client.infer_entities(server.http_url, "pubmed_ner", TEXTS)
    assert served == predict_entities(model_dir, TEXTS)
    # The Python models ran in the Python 3.10 stub, whose interpreter cannot import this
    # environment's Python 3.11 packages, so they used the image's.
    stub = tmp_path / "triton" / "backends" / "python" / "triton_python_backend_stub"
    expected = local_server.find_installation().stubs / IMAGE_PYTHON / stub.name
    assert filecmp.cmp(stub, expected, shallow=False)
