"""A tiny token-classification model in the FineTune output format, for export and serving tests.

It has the layout that a finished FineTune leaves in `model/`: an
`AutoModelForTokenClassification` with `id2label`, and the tokenizer files saved by
`PreTrainedTokenizerFast.save_pretrained`. The byte-level BPE tokenizer is trained on real
PubMed abstracts; the weights are random, which is enough to compare runtimes with each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2Config,
    GPT2ForTokenClassification,
    LlamaConfig,
    LlamaForTokenClassification,
    PreTrainedTokenizerFast,
)

LABELS = ("O", "B-Disease", "I-Disease")
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]


def read_abstracts(corpus_file: Path, limit: int) -> list[str]:
    """Read up to `limit` titles and abstracts from a PubTator file (`PMID|t|...`, `PMID|a|...`)."""
    texts = []
    with corpus_file.open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("|", 2)
            if len(parts) == 3 and parts[1] in ("t", "a"):
                texts.append(parts[2])
            if len(texts) >= limit:
                break
    return texts


def build_tokenizer(
    data_dir: Path, output: Path, vocab_size: int = 1000
) -> PreTrainedTokenizerFast:
    corpus = data_dir / "pubmed" / "ncbi-disease" / "corpus" / "NCBItrainset_corpus.txt"
    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(
        read_abstracts(corpus, 400), vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(output)
    return tokenizer


def build_model(
    data_dir: Path, output: Path, architecture: str = "llama", seed: int = 0
) -> Path:
    """Write a random-weight token classifier with a PubMed tokenizer to `output` and return it."""
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(data_dir, output)
    id2label = dict(enumerate(LABELS))
    label2id = {label: index for index, label in id2label.items()}
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), id2label=id2label, label2id=label2id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # As the FineTune stage records it for a causal model (lathe_trainer.finetune.data).
        lathe_label_subtoken="last",
    )
    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common,
        )
        model = LlamaForTokenClassification(config)
    elif architecture == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
        model = GPT2ForTokenClassification(config)
    else:
        raise ValueError(f"Unknown architecture {architecture!r}; use llama or gpt2.")
    model.eval()
    model.save_pretrained(output)
    return output
