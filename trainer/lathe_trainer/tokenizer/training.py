"""Train the byte-level BPE, give protected terms their own tokens, and save the result.

Called by `stage.run` after the patterns are compiled; the saved directory is what PretrainJob
and FineTune load with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lathe.api.tokenizer import TokenizerSpec
from lathe_trainer.tokenizer.patterns import ProtectedMatcher, lowercased

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"


def without_special_literals(
    texts: Iterable[str], special_tokens: list[str], found: Counter
) -> Iterator[str]:
    """Yield each text split around literal special tokens, counting them in `found`.

    NB: the BPE trainer of `tokenizers` 0.23 does not extract special tokens from the training
    text, so a corpus that contains `<|endoftext|>` or `[SEP]` would teach it fragments such as
    `|>` or `endof`. Special tokens match case-sensitively before normalization, the same way
    the trained tokenizer matches them when it encodes.
    """
    literal = re.compile("|".join(re.escape(token) for token in special_tokens))
    for text in texts:
        pieces = literal.split(text)
        if len(pieces) > 1:
            found.update(literal.findall(text))
        yield from (piece for piece in pieces if piece)


def count_protected_terms(
    texts: Iterable[str], matcher: ProtectedMatcher, lowercase: bool
) -> Counter:
    """Count each protected-pattern match in the training text, in its normalized form."""
    counts: Counter = Counter()
    for text in texts:
        for start, end in matcher.spans(text):
            term = text[start:end]
            # Character by character, as the tokenizer's Lowercase normalizer lowercases.
            counts[lowercased(term)[0] if lowercase else term] += 1
    return counts


def frequent_terms(counts: Counter, min_frequency: int, limit: int) -> list[str]:
    """Return the at most `limit` terms seen `min_frequency` times or more, most frequent first."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [term for term, count in ranked if count >= min_frequency][:limit]


def build_tokenizer(spec: TokenizerSpec, matcher: ProtectedMatcher) -> Tokenizer:
    """Return an untrained byte-level BPE tokenizer.

    There is no Unicode normalizer: byte-level BPE round-trips every input exactly, including
    compatibility characters such as ligatures and full-width digits. `lowercase` adds the
    only normalization.
    """
    tokenizer = Tokenizer(models.BPE())
    if spec.lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = matcher.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train(
    tokenizer: Tokenizer,
    texts: Callable[[], Iterable[str]],
    spec: TokenizerSpec,
    vocab_size: int,
    progress: Callable[[int], None],
) -> None:
    """Train the BPE merges on the texts, in place, up to `vocab_size` entries."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counted = 0

    def counting() -> Iterator[str]:
        nonlocal counted
        for text in texts():
            counted += 1
            if counted % 10000 == 0:
                progress(counted)
            yield text

    tokenizer.train_from_iterator(counting(), trainer)
    progress(counted)


def add_terms(tokenizer: Tokenizer, terms: Iterable[str]) -> tuple[Tokenizer, int]:
    """Give each term its own BPE vocabulary entry; return the new tokenizer and how many.

    Each protected match is a pre-token of its own, and with `ignore_merges` the BPE model
    returns a pre-token that is in its vocabulary as one token without applying merges. So a
    term needs only a vocabulary entry, not a chain of merges and intermediate tokens.
    """
    state = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    next_id = max(max(vocab.values()), max(t["id"] for t in state["added_tokens"])) + 1
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    added = 0
    for term in terms:
        (symbol, _), = to_bytes.pre_tokenize_str(term)
        if symbol not in vocab:
            vocab[symbol] = next_id
            next_id += 1
            added += 1
    state["model"]["ignore_merges"] = True
    return Tokenizer.from_str(json.dumps(state, ensure_ascii=False)), added


def save(tokenizer: Tokenizer, output_dir: Path) -> None:
    """Write tokenizer.json and the `transformers` files, loadable without network access."""
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        unk_token=UNK,
        # The default cleanup joins " ." into "." when decoding, which breaks round trips.
        clean_up_tokenization_spaces=False,
    )
    wrapper.save_pretrained(str(output_dir))
    log.info("Saved the tokenizer (%d entries) to %s.", tokenizer.get_vocab_size(), output_dir)
