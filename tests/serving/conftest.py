"""The export stage's output that the Triton tests serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_ner_model import build_model

from lathe.api import KINDS
from lathe.plans import stage_config
from lathe_trainer.export import stage
from lathe_trainer.stage import ResolvedInput

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "05-deployment.yaml"


@pytest.fixture(scope="session")
def export_output(tmp_path_factory, data_dir):
    """Run the export stage on a tiny model and return (output dir, model dir)."""
    root = tmp_path_factory.mktemp("finetune")
    model_dir = build_model(data_dir, root / "model")
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["export"]["quantization"]["enabled"] = False
    resource["spec"]["export"]["checkSequenceLengths"] = [3, 20]
    output = tmp_path_factory.mktemp("export")
    inputs = {"model": ResolvedInput(kind="FineTune", name="pubmed-ner", uri=f"file://{root}",
                                     digest="sha256:f")}
    model = KINDS["ModelDeployment"].model_validate(resource)
    stage.run(stage_config(model, inputs, f"file://{output}", str(data_dir)), resume=False)
    return output, model_dir
