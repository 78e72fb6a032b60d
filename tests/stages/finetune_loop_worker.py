"""Train one FineTune phase twice, as `python` or under torchrun, and print the losses as JSON.

The first run trains `--steps` steps from scratch with a checkpoint every 2 steps. The second
resumes from the checkpoint named by `--resume-from` (the later ones are deleted first), as a
retried attempt would. LATHE_FAULT_NAN_STEPS poisons steps in both runs, which `--non-finite`
then handles. Sentences of uneven length make each process pad to another length, so
dropout draws differ between processes. tests/stages/test_finetune.py reads the output.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForTokenClassification

from lathe_trainer.finetune import distributed
from lathe_trainer.finetune.data import EncodedSentence
from lathe_trainer.finetune.train import LoopSettings, Split, run_phase


def sentences(count: int) -> list[EncodedSentence]:
    generator = random.Random(0)
    encoded = []
    for _ in range(count):
        length = generator.randint(3, 30)
        ids = [generator.randrange(100) for _ in range(length)]
        labels = [generator.randrange(3) for _ in range(length)]
        encoded.append(EncodedSentence(ids, labels, list(range(length)), length, False))
    return encoded


def new_model() -> GPT2ForTokenClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        num_labels=3, classifier_dropout=0.5)
    return GPT2ForTokenClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume-from", type=int, required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--non-finite", default="fail")
    parser.add_argument("--strategy", default="ddp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.setup("gloo")
    settings = LoopSettings(
        max_steps=args.steps, micro_batch_size=2, accumulation_steps=1, learning_rate=1e-3,
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0, checkpoint_interval=2,
        keep_checkpoints=10, eval_interval=1000, pad_token_id=0,
        id2label={0: "O", 1: "B-X", 2: "I-X"}, precision=args.precision,
        non_finite=args.non_finite, strategy=args.strategy,
    )
    train = Split(sentences(64), [], [])
    if distributed.is_main():
        shutil.rmtree(args.phase_dir, ignore_errors=True)
    distributed.barrier()

    runs = []
    for resume in (False, True):
        losses: dict[int, float] = {}

        def report(step: int, message: str, **metrics) -> None:
            # Skipped steps and fp16 overflows report a message without a loss.
            if "loss" in metrics:
                losses[step] = metrics["loss"]

        result = run_phase("full", new_model(), train, None, settings, args.phase_dir, resume,
                           report)
        runs.append({"losses": losses, "result": result})
        if not resume and distributed.is_main():
            for step in range(args.resume_from + 1, args.steps + 1):
                shutil.rmtree(args.phase_dir / f"step-{step:08d}", ignore_errors=True)
        distributed.barrier()
    if distributed.is_main():
        print(json.dumps({"uninterrupted": runs[0], "resumed": runs[1]}))
    distributed.teardown()


if __name__ == "__main__":
    main()
