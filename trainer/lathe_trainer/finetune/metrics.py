"""Evaluation of a token classifier: word-level tags and entity-level scores.

The FineTune stage predicts a tag per word (from the sub-token of the word that training
labelled, as `finetune.data` describes) and scores whole entities with seqeval in its default mode, which
follows the CoNLL `conlleval` script: an entity counts only when its type and both boundaries
match.
"""

from __future__ import annotations

import torch
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from lathe_trainer.finetune import distributed
from lathe_trainer.finetune.data import IGNORE_INDEX, OUTSIDE, EncodedSentence, collate


def word_tags(
    token_predictions: list[int], item: EncodedSentence, id2label: dict[int, str]
) -> list[str]:
    """Map token predictions to one tag per word; words cut off by truncation get `O`.

    Each word's tag is the prediction at the token that carries its label in `item.labels`.
    """
    tags = [OUTSIDE] * item.num_words
    for prediction, index, label in zip(token_predictions, item.word_index, item.labels):
        if label != IGNORE_INDEX:
            tags[index] = id2label[prediction]
    return tags


@torch.no_grad()
def predict_local(
    model, sentences: list[EncodedSentence], batch_size: int, pad_token_id: int,
    id2label: dict[int, str],
) -> list[list[str]]:
    """Predict word tags for sentences in this process, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[list[str]] = []
    for start in range(0, len(sentences), batch_size):
        batch = sentences[start:start + batch_size]
        inputs = collate(batch, pad_token_id)
        logits = model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
        ).logits
        best = logits.argmax(dim=-1).tolist()
        for item, row in zip(batch, best):
            predictions.append(
                word_tags(row[:len(item.input_ids)], item, id2label)
            )
    model.train(was_training)
    return predictions


def predict(
    model, sentences: list[EncodedSentence], batch_size: int, pad_token_id: int,
    id2label: dict[int, str],
) -> list[list[str]]:
    """Predict word tags for all sentences, each process taking every world_size-th one."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = predict_local(model, sentences[rank::world], batch_size, pad_token_id, id2label)
    shards = distributed.all_gather_object(mine)
    ordered: list[list[str]] = [[] for _ in sentences]
    for shard_rank, shard in enumerate(shards):
        for offset, tags in enumerate(shard):
            ordered[shard_rank + offset * world] = tags
    return ordered


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict:
    """Return entity-level precision, recall and F1 (micro average) and per-type figures."""
    per_type = classification_report(gold, predicted, output_dict=True, zero_division=0)
    return {
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
        # seqeval's own chunking, which also starts an entity at an I- tag after O (IOB1).
        "goldEntities": sum(len(get_entities(tags)) for tags in gold),
        "perType": {
            name: {key: float(value) for key, value in figures.items()}
            for name, figures in per_type.items()
            if not name.endswith("avg")
        },
    }
