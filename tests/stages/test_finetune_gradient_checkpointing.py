"""spec.training.gradientCheckpointing in the FineTune stage, on the tiny base model that
test_finetune builds: LoRA and the from-scratch comparison train to the same losses with it."""

from __future__ import annotations

import json

import pytest

from lathe_trainer.finetune import stage
from test_finetune import (  # noqa: F401 (the fixtures are used by name)
    base_input,
    base_output,
    one_thread,
    resource,
)

pytestmark = pytest.mark.slow


def test_gradient_checkpointing_keeps_losses(make_config, tmp_path, base_output, monkeypatch):
    trained = []
    run_phase = stage.run_phase

    def recording_run_phase(name, model, *args, **kwargs):
        trained.append((name, model.base_model.is_activation_checkpointing))
        return run_phase(name, model, *args, **kwargs)

    monkeypatch.setattr(stage, "run_phase", recording_run_phase)
    reports = {}
    for enabled in (False, True):
        training = {"maxSteps": 6, "microBatchSize": 8, "learningRate": 0.01, "warmupSteps": 1,
                    "checkpointInterval": 3, "evalInterval": 1000,
                    "gradientCheckpointing": enabled}
        spec = resource(compareFromScratch=True, maxTrainSentences=64, maxEvalSentences=16,
                        training=training)
        output = tmp_path / f"checkpointing-{enabled}"
        stage.run(make_config(spec, base_input(base_output), output=output), resume=False)
        reports[enabled] = json.loads((output / "report.json").read_text())
    assert trained == [("lora", False), ("scratch", False), ("lora", True), ("scratch", True)]
    plain, checkpointed = reports[False], reports[True]
    for phase in ("test", "fromScratch"):
        assert checkpointed[phase]["finalLoss"] == pytest.approx(plain[phase]["finalLoss"],
                                                                 abs=1e-5), phase
        assert checkpointed[phase]["f1"] == pytest.approx(plain[phase]["f1"], abs=1e-6), phase
