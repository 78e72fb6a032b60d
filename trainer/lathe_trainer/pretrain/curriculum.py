"""Curriculum stages of the PretrainJob: which packed data trains which optimizer steps.

Each stage of `spec.curriculum` packs the train split on its own, at its sequence length and
from the documents at or above its quality floor. A job without a curriculum has one stage:
every document at `spec.sequenceLength` until `training.maxSteps`.

The data position (epoch, cursor) in a checkpoint belongs to the stage of the *next* step:
the trainer switches stage, and resets the position, right after the last step of a stage and
before it saves a checkpoint. So a run resumed from a checkpoint at a stage boundary starts
the new stage from its beginning, as the uninterrupted run did.
"""

from __future__ import annotations

from dataclasses import dataclass

from lathe.api.pretrain import PretrainJobSpec
from lathe_trainer.pretrain.data import PackedSplit, TokenizedSplit, pack

# Stage k > 0 shuffles with seed + k * STAGE_SEED_STRIDE, so stages draw different orders
# while stage 0 keeps the order of a job without a curriculum.
STAGE_SEED_STRIDE = 7919


@dataclass
class CurriculumStage:
    """A stage with its packed train sequences, which trains the steps up to until_step."""

    index: int
    until_step: int
    sequence_length: int
    min_quality: float | None
    train: PackedSplit

    def seed(self, base_seed: int) -> int:
        return base_seed + self.index * STAGE_SEED_STRIDE

    def describe(self) -> dict:
        return {
            "index": self.index,
            "untilStep": self.until_step,
            "sequenceLength": self.sequence_length,
            "minQuality": self.min_quality,
            "trainSequences": len(self.train),
            "trainDocuments": self.train.documents,
            "trainTokens": self.train.tokens,
        }


def build_stages(spec: PretrainJobSpec, tokenized: TokenizedSplit) -> list[CurriculumStage]:
    """Pack the train split once per curriculum stage (once in all without a curriculum)."""
    max_steps = spec.training.max_steps
    if spec.curriculum is None:
        return [CurriculumStage(0, max_steps, spec.sequence_length, None,
                                pack(tokenized, spec.sequence_length))]
    stages = []
    for index, stage_spec in enumerate(spec.curriculum.stages):
        last = index == len(spec.curriculum.stages) - 1
        length = stage_spec.sequence_length or spec.sequence_length
        until = max_steps if last else stage_spec.until_step
        train = pack(tokenized, length, stage_spec.min_quality)
        stages.append(CurriculumStage(index, until, length, stage_spec.min_quality, train))
    return stages


def stage_for_step(stages: list[CurriculumStage], completed_steps: int) -> CurriculumStage:
    """Return the stage that trains the step after `completed_steps`."""
    for stage in stages:
        if completed_steps < stage.until_step:
            return stage
    return stages[-1]
