"""The Tokenizer stage on real PubMed abstracts: outputs, report, special tokens and codes.

The Corpus input is written here in the Corpus output format from the BC5CDR PubTator files,
so these tests do not depend on the Corpus stage.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lathe_trainer.stage import ResolvedInput, StageError
from lathe_trainer.tokenizer import stage

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "02-tokenizer.yaml"
TRAIN_DOCUMENTS = 300
VALIDATION_DOCUMENTS = 100
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]
LITERALS = ["[SEP]", "[UNK]", "<|endoftext|>"]

pytestmark = pytest.mark.slow


def read_pubtator(path: Path, limit: int) -> list[dict]:
    """Return up to `limit` documents (title and abstract) from a PubTator file."""
    documents: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] in ("t", "a"):
            documents.setdefault(parts[0], []).append(parts[2])
    items = list(documents.items())[:limit]
    return [{"id": pmid, "source": path.name, "text": " ".join(text)} for pmid, text in items]


def write_corpus(root: Path, data_dir: Path, decorate=lambda index, text: text) -> ResolvedInput:
    bc5cdr = data_dir / "pubmed" / "bc5cdr"
    splits = {
        "train": read_pubtator(bc5cdr / "CDR_TrainingSet.PubTator.txt", TRAIN_DOCUMENTS),
        "validation": read_pubtator(bc5cdr / "CDR_DevelopmentSet.PubTator.txt",
                                    VALIDATION_DOCUMENTS),
    }
    for split, documents in splits.items():
        (root / split).mkdir(parents=True)
        with (root / split / "shard-00000.jsonl").open("w", encoding="utf-8") as handle:
            for index, document in enumerate(documents):
                document = {**document, "text": decorate(index, document["text"])}
                handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    return ResolvedInput(kind="Corpus", name="c", uri=f"file://{root}", digest="sha256:x")


def example_patterns() -> list[dict]:
    """The protected patterns of the PubMed example, so the example is what gets tested."""
    return yaml.safe_load(EXAMPLE.read_text())["spec"]["protectedPatterns"]


def tokenizer_resource(**spec) -> dict:
    return {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "Tokenizer",
        "metadata": {"name": "tok"},
        "spec": {"corpusRef": {"name": "c"}, "vocabSize": 2000, **spec},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One tokenizer with the example's patterns and the full ICD-10-CM vocabulary file."""
    from lathe.api import KINDS
    from lathe.plans import stage_config

    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus", data_dir)
    patterns = example_patterns()
    patterns[0].update(vocabularyFile="icd10/categories.csv", dottedFormAfter=3)
    resource = KINDS["Tokenizer"].model_validate(
        tokenizer_resource(protectedPatterns=patterns)
    )
    output = root / "out"
    config = stage_config(resource, {"corpus": corpus}, f"file://{output}", str(data_dir))
    metrics = stage.run(config, resume=False)
    return output, metrics, Tokenizer.from_file(str(output / "tokenizer.json"))


def icd10_codes(data_dir: Path) -> list[str]:
    with (data_dir / "icd10" / "categories.csv").open(encoding="utf-8", newline="") as handle:
        return [row[0] for row in csv.reader(handle)]


def test_outputs_load_offline(trained, monkeypatch):
    output, _, tokenizer = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(str(output))
    from_file = PreTrainedTokenizerFast(tokenizer_file=str(output / "tokenizer.json"))
    text = "Naloxone 0.2 to 2 mg/kg reversed E11.9 <|endoftext|>"
    expected = tokenizer.encode(text).ids
    assert auto(text)["input_ids"] == expected
    assert from_file(text)["input_ids"] == expected
    assert auto.eos_token == auto.bos_token == "<|endoftext|>"
    assert auto.pad_token == "<pad>"
    assert auto.unk_token == "<unk>"
    assert auto.pad_token_id == tokenizer.token_to_id("<pad>")


def test_report_and_manifest(trained):
    output, metrics, tokenizer = trained
    report = json.loads((output / "report.json").read_text())
    manifest = json.loads((output / "manifest.json").read_text())
    validation = report["validation"]
    assert manifest["metrics"] == metrics
    assert metrics["validationDocuments"] == VALIDATION_DOCUMENTS
    assert metrics["trainDocuments"] == TRAIN_DOCUMENTS
    assert 1.0 < metrics["fertility"] < 3.0
    assert 2.0 < metrics["bytesPerToken"] < 8.0
    assert validation["protected_patterns"]["dose"]["matches"] > 10
    # Every match is kept apart from its context; doses seen twice in training, and every
    # ICD-10-CM code, are also one token. Open-ended doses seen less often are not.
    assert metrics["protectedKeptApartShare"] == 1.0
    assert metrics["protectedKeptWholeShare"] >= 0.2
    assert report["special_token_fragments"] == []
    assert report["vocab_size"] == tokenizer.get_vocab_size()
    assert report["vocabulary_files"]["icd10"]["rejected"] == 0
    assert "tokenizer.json" in manifest["outputs"]


def test_every_icd10_code_one_token(trained, data_dir):
    """All 24,628 ICD-10-CM codes, undotted and dotted, each encode as one token."""
    _, _, tokenizer = trained
    codes = icd10_codes(data_dir)
    dotted = [f"{code[:3]}.{code[3:]}" for code in codes if len(code) > 3]
    forms = codes + dotted
    encodings = tokenizer.encode_batch(forms, add_special_tokens=False)
    split = [form for form, encoding in zip(forms, encodings) if len(encoding.ids) != 1]
    assert split == []


CONTEXTS = [
    "{}",
    "{} was recorded at admission.",
    "Diagnosis: {}",
    "Patients ({}) were followed.",
    "The code was\n{}\nin the chart.",
    "first line ended with {}",
    "    {} after indentation",
    "\t{}, then a comma",
]
CODES = ["E11.9", "E119", "I10", "Z79.4", "5 mg/kg"]


@pytest.mark.parametrize("term", CODES)
def test_code_same_tokens_in_every_context(trained, term):
    """A protected term is one token, the same id wherever it appears."""
    _, _, tokenizer = trained
    ids = set()
    for context in CONTEXTS:
        text = context.format(term)
        start = text.index(term)
        encoding = tokenizer.encode(text, add_special_tokens=False)
        covering = [
            token_id for token_id, (begin, end) in zip(encoding.ids, encoding.offsets)
            if begin < start + len(term) and end > start
        ]
        assert len(covering) == 1, (text, encoding.tokens)
        ids.update(covering)
    assert len(ids) == 1


ROUND_TRIPS = [
    "two  spaces,   three   and\t\ttabs",
    "    indented four\n        indented eight\n\tTabbed",
    "trailing spaces   \n\n\nblank lines",
    "\u2002en space, \u3000ideographic space, \u00a0non-breaking space",
    "\ufe30 \u0149 \ufb05 \uff11\uff12\uff13 mg \u00a0 \u00b5g \u03bcg",
    "Greek \u03b1-adrenoceptor, accents caf\u00e9, emoji \U0001f9ea, CJK \u7cd6\u5c3f\u75c5",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip_is_exact(trained, text):
    """Byte-level BPE without a normalizer decodes to exactly the input, whitespace included."""
    output, _, tokenizer = trained
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    auto = AutoTokenizer.from_pretrained(str(output))
    assert auto.decode(auto(text)["input_ids"]) == text


def entries_inside_specials(tokenizer: Tokenizer, specials: list[str]) -> set[str]:
    """Vocabulary entries, 2+ characters, that are part of a special token (ignoring case)."""
    found = set()
    for entry in tokenizer.get_vocab(with_added_tokens=False):
        text = tokenizer.decoder.decode([entry]).strip().lower()
        if len(text) >= 2 and entry not in specials and any(
            text in special.lower() for special in specials
        ):
            found.add(entry)
    return found


def decorate_with_literals(index: int, text: str) -> str:
    """Put the literal special tokens inside and after a document, as scraped text can have."""
    literal = LITERALS[index % len(LITERALS)]
    middle = len(text) // 2
    return f"{text[:middle]} {literal} {text[middle:]} {' '.join(LITERALS)}"


def train_on(root: Path, data_dir: Path, make_config, lowercase: bool, decorate) -> tuple:
    corpus = write_corpus(root / "corpus", data_dir, decorate)
    resource = tokenizer_resource(
        lowercase=lowercase,
        specialTokens=SPECIAL_TOKENS + ["[SEP]", "[UNK]"],
        protectedPatterns=example_patterns(),
    )
    config = make_config(resource, {"corpus": corpus}, root / "out")
    stage.run(config, resume=False)
    report = json.loads((root / "out" / "report.json").read_text())
    return Tokenizer.from_file(str(root / "out" / "tokenizer.json")), report


@pytest.mark.parametrize("lowercase", [False, True], ids=["cased", "lowercase"])
def test_special_literals_in_corpus(tmp_path, data_dir, make_config, lowercase):
    """Literal special tokens in the corpus neither split nor leave fragments in the vocabulary."""
    specials = SPECIAL_TOKENS + ["[SEP]", "[UNK]"]
    tokenizer, report = train_on(
        tmp_path / "literals", data_dir, make_config, lowercase, decorate_with_literals
    )
    control, _ = train_on(tmp_path / "control", data_dir, make_config, lowercase,
                          lambda index, text: text)
    for special in specials:
        assert tokenizer.encode(special).ids == [tokenizer.token_to_id(special)]
    text = "before [SEP] middle [UNK] after<|endoftext|>"
    encoding = tokenizer.encode(text)
    assert encoding.tokens.count("[SEP]") == 1
    assert encoding.tokens[-1] == "<|endoftext|>"
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    assert report["special_token_fragments"] == []
    # An entry that is part of a special token is fine only if plain text alone produces it.
    extra = entries_inside_specials(tokenizer, specials) - entries_inside_specials(
        control, specials
    )
    assert extra == set()
    removed = report["train"]["special_token_literals_removed"]
    assert removed == {"[SEP]": 400, "[UNK]": 400, "<|endoftext|>": 400}


def test_lowercase_normalization_is_pinned(tmp_path, data_dir, make_config):
    """With lowercase on, decoding returns the lowercased input and codes keep their tokens."""
    tokenizer, report = train_on(tmp_path, data_dir, make_config, True, lambda i, text: text)
    text = "\ufe30 \u0149 \ufb05 \uff11\uff12 \u00a0 Given 5 MG/KG for E11.9"
    encoding = tokenizer.encode(text)
    assert report["normalization"] == "lowercase"
    assert tokenizer.decode(encoding.ids) == text.lower()
    assert "5Ġmg/kg" in encoding.tokens
    # E11.9 is not in this corpus, so it takes its fixed split, the same as on its own.
    code_ids = tokenizer.encode("e11.9").ids
    assert encoding.ids[-len(code_ids):] == code_ids


def test_invalid_regex_names_field(tmp_path, data_dir, make_config):
    corpus = write_corpus(tmp_path / "corpus", data_dir)
    config = make_config(tokenizer_resource(protectedPatterns=example_patterns()),
                         {"corpus": corpus})
    config.spec["protectedPatterns"][0]["regex"] = "[A-Z(0-9"
    with pytest.raises(StageError, match=r"spec\.protectedPatterns\[0\]\.regex: invalid value "
                       r"'\[A-Z\(0-9': invalid regular expression: unterminated character set "):
        stage.run(config, resume=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_python_only_regex_rejected(tmp_path, data_dir, make_config):
    corpus = write_corpus(tmp_path / "corpus", data_dir)
    patterns = [{"name": "icd10", "regex": r"(?P<category>[A-Z][0-9]{2})\.?[0-9]"}]
    config = make_config(tokenizer_resource(protectedPatterns=patterns), {"corpus": corpus})
    with pytest.raises(StageError, match=r"spec\.protectedPatterns\[0\]\.regex: .*Oniguruma"):
        stage.run(config, resume=False)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"inputs": {}}, r"spec\.corpusRef", "no resolved Corpus input"),
        ({"vocabularyFile": "icd10/missing.csv"},
         r"spec\.protectedPatterns\[0\]\.vocabularyFile", "does not exist"),
    ],
)
def test_bad_input_names_field(tmp_path, data_dir, make_config, change, field, message):
    corpus = write_corpus(tmp_path / "corpus", data_dir)
    patterns = example_patterns()
    if "vocabularyFile" in change:
        patterns[0]["vocabularyFile"] = change["vocabularyFile"]
    inputs = change.get("inputs", {"corpus": corpus})
    config = make_config(tokenizer_resource(protectedPatterns=patterns), inputs)
    with pytest.raises(StageError, match=f"{field}: .*{message}"):
        stage.run(config, resume=False)


def test_malformed_records_counted(tmp_path, data_dir, make_config):
    corpus = write_corpus(tmp_path / "corpus", data_dir)
    shard = tmp_path / "corpus" / "train" / "shard-00000.jsonl"
    with shard.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "x1", "source": "s"}) + "\n")
        handle.write(json.dumps({"id": "x2", "source": "s", "text": None}) + "\n")
    config = make_config(tokenizer_resource(), {"corpus": corpus})
    stage.run(config, resume=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"]["malformed_records"] == 2
    assert report["train"]["documents"] == TRAIN_DOCUMENTS
    assert os.path.exists(tmp_path / "out" / "manifest.json")


def test_invalid_regex_exits_permanent(tmp_path, data_dir, make_config, capsys):
    """The workload entry point turns the StageError into the no-retry exit code."""
    from lathe_trainer.__main__ import main
    from lathe_trainer.stage import EXIT_PERMANENT

    corpus = write_corpus(tmp_path / "corpus", data_dir)
    config = make_config(tokenizer_resource(protectedPatterns=example_patterns()),
                         {"corpus": corpus})
    config.spec["protectedPatterns"][1]["regex"] = "(?<=mg"
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    assert main(["tokenizer", "--config", str(path)]) == EXIT_PERMANENT
    assert ("spec.protectedPatterns[1].regex: invalid value '(?<=mg': invalid regular "
            "expression: ") in capsys.readouterr().err


def test_short_vocabulary_reported(tmp_path, data_dir, make_config, caplog):
    """A corpus too small for spec.vocabSize gives fewer tokens, and a warning reports it."""
    corpus = write_corpus(tmp_path / "corpus", data_dir,
                          lambda index, text: text[:200] if index < 20 else "")
    config = make_config(tokenizer_resource(vocabSize=200000), {"corpus": corpus},
                         tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="lathe_trainer.tokenizer.stage"):
        stage.run(config, resume=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["requested_vocab_size"] == 200000
    assert report["learned_vocab_size"] < 200000
    assert "fewer than the 200000 that spec.vocabSize" in caplog.text
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["vocabShortfall"] == (
        200000 - report["protected_terms_from_training"] - report["learned_vocab_size"])
