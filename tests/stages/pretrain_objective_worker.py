"""Run the PretrainJob stage, under torchrun, and record where the objective corrupted each
training micro-batch on this rank.

Usage: `pretrain_objective_worker.py CONFIG RECORD_DIR [--resume]`. Each rank writes
`RECORD_DIR/rank-N.json`: one entry per training micro-batch, the (row, column) positions that
masked LM selected or that span corruption replaced by sentinels. The validation batches, which
the stage prepares with a generator of its own, are left out. tests/stages/test_pretrain_models.py
reads the records.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lathe_trainer.pretrain import objectives, stage
from lathe_trainer.stage import StageConfig
from lathe_trainer.training.loss import IGNORE_INDEX

records: list[list[list[int]]] = []


def corrupted_positions(objective, batch: objectives.Batch) -> list[list[int]]:
    if isinstance(objective, objectives.MaskedLM):
        corrupted = batch.labels != IGNORE_INDEX
    else:
        first_sentinel = objective.sentinel(objectives.T5_SENTINELS - 1)
        corrupted = batch.inputs["input_ids"] >= first_sentinel
    return corrupted.nonzero().tolist()


def recording(prepare):
    def prepare_and_record(self, sequences, generator=None):
        batch = prepare(self, sequences, generator)
        if generator is None:
            records.append(corrupted_positions(self, batch))
        return batch

    return prepare_and_record


def main() -> None:
    config_path, record_dir = Path(sys.argv[1]), Path(sys.argv[2])
    for objective in (objectives.MaskedLM, objectives.SpanCorruption):
        objective.prepare = recording(objective.prepare)
    config = StageConfig.model_validate(json.loads(config_path.read_text()))
    stage.run(config, resume="--resume" in sys.argv[3:])
    record_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (record_dir / f"rank-{rank}.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main()
