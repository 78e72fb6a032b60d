"""The Corpus stage on the real PubMed sources of the example, and on broken copies of them.

The example run (7 sources, about 3,300 documents) happens once per module; the other tests use
small copies written under tmp_path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
import yaml

from lathe.api import KINDS
from lathe.plans import stage_config
from lathe_trainer.corpus import stage
from lathe_trainer.corpus.shingles import word_ngrams, word_tokens
from lathe_trainer.datasets import iter_documents
from lathe_trainer.stage import StageError, read_manifest, sha256_file

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pubmed" / "01-corpus.yaml"
NCBI_TEST = "pubmed/ncbi-disease/corpus/NCBItestset_corpus.txt"
BC5CDR_TRAIN = "pubmed/bc5cdr/CDR_TrainingSet.PubTator.txt"
PUBMEDQA = "pubmed/pubmedqa/ori_pqal.json"
NCBI_CONLL_TEST = "pubmed/ncbi-disease/conll/test.tsv"
BC5CDR_CONLL_TEST = "pubmed/bc5cdr-ner/test.tsv"


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _pubtator_texts(path: Path) -> dict[str, str]:
    """Title and abstract per PMID, parsed here independently of the stage's reader."""
    texts: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] in ("t", "a"):
            texts.setdefault(parts[0], []).append(parts[2])
    return {pmid: "\n".join(parts) for pmid, parts in texts.items()}


@pytest.fixture(scope="module")
def example_run(data_dir, tmp_path_factory):
    """Run the example once and return (output directory, metrics).

    This builds the config as the `make_config` fixture does, but module-scoped, so the six
    tests below share one real run.
    """
    resource = KINDS["Corpus"].model_validate(_example())
    output = tmp_path_factory.mktemp("corpus")
    config = stage_config(resource, {}, f"file://{output}", str(data_dir))
    return output, stage.run(config, resume=False)


def test_example_counts_add_up(example_run):
    output, metrics = example_run
    stats = json.loads((output / "stats.json").read_text())
    removed = sum(stats["removed"].values())
    assert list(stats["removed"]) == [
        "minWords", "exactDuplicates", "nearDuplicates", "decontamination",
    ]
    assert stats["documentsIn"] == 500 * 3 + 593 + 100 + 100 + 1000
    assert stats["documentsIn"] - stats["malformed"] - removed == stats["documentsOut"]
    assert stats["documentsOut"] == metrics["trainDocuments"] + metrics["validationDocuments"]
    assert sum(s["documentsOut"] for s in stats["sources"]) == stats["documentsOut"]
    assert metrics["documentsOut"] == stats["documentsOut"]
    assert metrics["malformed"] == 0


def test_example_removes_ncbi_test_documents(example_run, data_dir):
    output, metrics = example_run
    test_texts = _pubtator_texts(data_dir / NCBI_TEST)
    test_ngrams = set().union(*(word_ngrams(word_tokens(t), 13) for t in test_texts.values()))
    documents = [d for split in ("train", "validation") for d in iter_documents(str(output), split)]
    assert metrics["removed"]["decontamination"] >= len(test_texts)
    assert not [d["id"] for d in documents if d["source"] == "ncbi-disease-test"]
    assert not [d["id"] for d in documents if d["recordId"] in test_texts]
    overlapping = [
        d["id"] for d in documents if word_ngrams(word_tokens(d["text"]), 13) & test_ngrams
    ]
    assert overlapping == []


def test_example_manifest_records_digests(example_run, data_dir):
    output, metrics = example_run
    manifest = read_manifest(f"file://{output}")
    assert manifest is not None
    expected = {
        source["name"]: sha256_file(data_dir / source["path"])
        for source in _example()["spec"]["sources"]
    }
    expected["ncbi-disease-test"] = sha256_file(data_dir / NCBI_TEST)
    assert manifest["metrics"]["sourceDigests"] == expected
    paths = [source["path"] for source in _example()["spec"]["sources"]]
    eval_paths = [item["path"] for item in _example()["spec"]["decontamination"]["evalSets"]]
    assert manifest["data"] == {path: sha256_file(data_dir / path)
                                for path in [*paths, *eval_paths]}
    stats = json.loads((output / "stats.json").read_text())
    assert stats["sourceDigests"] == expected
    assert set(manifest["outputs"]) == {
        "train/shard-00000.jsonl", "train/shard-00001.jsonl",
        "validation/shard-00000.jsonl", "validation/shard-00001.jsonl",
        "stats.json", "data_card.md",
    }


def test_example_shards_hold_unique_documents(example_run):
    output, metrics = example_run
    train = list(iter_documents(str(output), "train"))
    validation = list(iter_documents(str(output), "validation"))
    ids = [d["id"] for d in train + validation]
    assert len(train) == metrics["trainDocuments"]
    assert len(validation) == metrics["validationDocuments"]
    assert len(ids) == len(set(ids))
    assert 0.03 < len(validation) / len(ids) < 0.07
    assert all(d["text"].strip() for d in train + validation)


def test_example_data_card_lists_sources(example_run):
    output, _ = example_run
    card = (output / "data_card.md").read_text()
    for source in _example()["spec"]["sources"]:
        assert f"| {source['name']} |" in card
    assert f"`{NCBI_TEST}` (ncbiDisease: 100 documents with " in card


def test_example_reports_progress_per_step(example_run):
    output, _ = example_run
    records = [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]
    assert [r["completed"] for r in records] == list(range(1, len(stage.STEPS) + 1))
    assert records[-1]["total"] == len(stage.STEPS)


def _corpus(sources: list[dict], **spec) -> dict:
    return {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "Corpus",
        "metadata": {"name": "small"},
        "spec": {"sources": sources, **spec},
    }


def _broken_copies(data_dir: Path, tmp_path: Path) -> tuple[list[dict], list[tuple[str, int]]]:
    """Write a PubTator file with two broken documents and a PubMedQA file with one.

    Returns the sources and, per broken PubTator document, its PMID and the line reported.
    """
    blocks = (data_dir / BC5CDR_TRAIN).read_text().strip().split("\n\n")[:30]
    lines = [block.split("\n") for block in blocks]
    del lines[4][1]  # the abstract line: reported at the title line
    lines[9].insert(2, "garbage")  # reported at the garbage line
    starts = [1 + sum(len(block) + 1 for block in lines[:i]) for i in range(len(lines))]
    broken = [(lines[4][0].split("|")[0], starts[4]), (lines[9][0].split("|")[0], starts[9] + 2)]
    pubtator = tmp_path / "broken.PubTator.txt"
    pubtator.write_text("\n\n".join("\n".join(block) for block in lines) + "\n")
    data = json.loads((data_dir / PUBMEDQA).read_text())
    sample = {pmid: data[pmid] for pmid in list(data)[:20]}
    del sample[list(sample)[3]]["CONTEXTS"]
    pubmedqa = tmp_path / "pqal.json"
    pubmedqa.write_text(json.dumps(sample))
    sources = [
        {"name": "broken-pubtator", "format": "pubtator", "path": str(pubtator)},
        {"name": "broken-pubmedqa", "format": "pubmedqa", "path": str(pubmedqa)},
    ]
    return sources, broken


def test_malformed_records_reach_stats(make_config, data_dir, tmp_path):
    sources, broken = _broken_copies(data_dir, tmp_path)
    config = make_config(_corpus(sources))
    metrics = stage.run(config, resume=False)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    by_name = {source["name"]: source for source in stats["sources"]}
    assert by_name["broken-pubtator"]["malformed"] == 2
    assert by_name["broken-pubmedqa"]["malformed"] == 1
    pubtator_examples = by_name["broken-pubtator"]["malformedExamples"]
    assert [e["recordId"] for e in pubtator_examples] == [pmid for pmid, _ in broken]
    assert [e["line"] for e in pubtator_examples] == [line for _, line in broken]
    assert by_name["broken-pubmedqa"]["malformedExamples"][0]["recordId"] is not None
    assert metrics["malformed"] == 3
    assert metrics["documentsIn"] == 50
    removed = sum(metrics["removed"].values())
    assert metrics["documentsIn"] - metrics["malformed"] - removed == metrics["documentsOut"]


def test_rerun_writes_identical_shards(make_config, data_dir, tmp_path):
    sources, _ = _broken_copies(data_dir, tmp_path)
    resource = _corpus(sources, shards=3)
    first = stage.run(make_config(resource, output=tmp_path / "first"), resume=False)
    second = stage.run(make_config(resource, output=tmp_path / "second"), resume=True)
    manifests = [read_manifest(f"file://{tmp_path / name}") for name in ("first", "second")]
    assert manifests[0]["outputs"] == manifests[1]["outputs"]
    assert first == second


def test_pii_is_redacted_in_shards(make_config, tmp_path):
    notes = tmp_path / "notes.jsonl"
    records = [
        {"id": "n1", "text": "Seen in clinic, MRN: 1234567, call 555-123-4567 with results."},
        {"id": "n2", "text": "Reply to jane.doe@example.org about E11.9 and 5 mg/kg dosing."},
        {"id": "n3", "text": "Follow-up for PMID 9949209 cohort, p = 0.001 in 1998."},
    ]
    notes.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = make_config(_corpus([{"name": "notes", "format": "jsonl", "path": str(notes)}]))
    metrics = stage.run(config, resume=False)
    output = str(tmp_path / "out")
    documents = [d for split in ("train", "validation") for d in iter_documents(output, split)]
    texts = {d["recordId"]: d["text"] for d in documents}
    assert metrics["piiRedactions"] == {"email": 1, "mrn": 1, "phone": 1}
    assert texts["n1"] == "Seen in clinic, MRN: <MRN>, call <PHONE> with results."
    assert texts["n2"] == "Reply to <EMAIL> about E11.9 and 5 mg/kg dosing."
    assert texts["n3"] == records[2]["text"]


def test_missing_source_names_field(make_config):
    sources = [
        {"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN},
        {"name": "pubmedqa", "format": "pubmedqa", "path": PUBMEDQA},
        {"name": "absent", "format": "text", "path": "pubmed/absent.txt"},
    ]
    with pytest.raises(StageError, match=r"spec\.sources\[2\]\.path: file '.*pubmed/absent\.txt' "
                       r"does not exist; fix the path"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_missing_eval_set_names_field(make_config):
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "gone", "format": "ncbiDisease", "path": "pubmed/gone.txt"}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"spec\.decontamination\.evalSets\[0\]\.path"):
        stage.run(make_config(resource), resume=False)


def test_duplicate_source_name_raises(make_config):
    sources = [
        {"name": "same", "format": "pubtator", "path": BC5CDR_TRAIN},
        {"name": "same", "format": "pubmedqa", "path": PUBMEDQA},
    ]
    # The API model rejects the spec before any stage could run it.
    with pytest.raises(ValidationError, match=r"source names \['same'\] are used more than once"):
        make_config(_corpus(sources))


def test_source_in_wrong_format_raises(make_config, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("A plain note about E11.9, not JSON.\n")
    sources = [{"name": "wrong", "format": "pubmedqa", "path": str(notes)}]
    with pytest.raises(StageError, match=r"spec\.sources\[0\]\.format: file .* is not UTF-8 JSON"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_eval_set_in_wrong_format_raises(make_config):
    """An evaluation set read in the wrong format would remove nothing and leave the test
    documents in training, so it fails the stage instead."""
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "ncbi-test", "format": "jsonl", "path": NCBI_TEST}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"spec\.decontamination\.evalSets\[0\]\.format: "
                       r"evaluation set 'ncbi-test' .* has format 'jsonl', but (\d+) of the \1 "
                       r"blocks in its first 1000 lines start with a PubTator `PMID\|t\|title` "
                       r"line; use format: pubtator\.$"):
        stage.run(make_config(resource), resume=False)


@pytest.mark.parametrize("declared", ["text", "jsonl"])
def test_conll_eval_set_as_text_raises(make_config, declared):
    """Read as `text`, a CoNLL sentence has a tag after every token, so it matches nothing."""
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [
        {"name": "ncbi-test", "format": "ncbiDisease", "path": NCBI_TEST},
        {"name": "ncbi-conll", "format": declared, "path": NCBI_CONLL_TEST},
    ]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"spec\.decontamination\.evalSets\[1\]\.format: "
                       rf"evaluation set 'ncbi-conll' .* has format '{declared}', but (\d+) of "
                       r"the \1 non-blank lines in its first 1000 lines are CoNLL lines "
                       r"\(`token<TAB>tag`, or space-separated columns ending with an IOB tag\); "
                       r"use format: conll\.$"):
        stage.run(make_config(resource), resume=False)


def test_pubtator_eval_set_as_text_raises(make_config):
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "ncbi-test", "format": "text", "path": NCBI_TEST}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"evalSets\[0\]\.format: evaluation set 'ncbi-test' .* "
                       r"has format 'text', but .*; use format: pubtator\.$"):
        stage.run(make_config(resource), resume=False)


def test_conll_source_as_text_raises(make_config):
    sources = [
        {"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN},
        {"name": "bc5cdr-ner", "format": "text", "path": BC5CDR_CONLL_TEST},
    ]
    with pytest.raises(StageError, match=r"spec\.sources\[1\]\.format: source 'bc5cdr-ner' .* "
                       r"has format 'text', but .*; use format: conll\.$"):
        stage.run(make_config(_corpus(sources)), resume=False)


@pytest.mark.parametrize("declared", ["text", "jsonl"])
def test_pubmedqa_source_as_other_format_raises(make_config, declared):
    """Read as `text`, the JSON would become one document of braces and keys. Read as `jsonl`,
    every line would be malformed."""
    sources = [{"name": "pubmedqa", "format": declared, "path": PUBMEDQA}]
    with pytest.raises(StageError, match=r"spec\.sources\[0\]\.format: source 'pubmedqa' .* "
                       rf"has format '{declared}', but it is a JSON object, and (\d+) of the \1 "
                       r"entries .* are PubMedQA entries with a `CONTEXTS` list; use format: "
                       r"pubmedqa\.$"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_short_eval_set_raises(make_config, tmp_path):
    """Documents shorter than ngramSize add no n-gram and remove only identical documents."""
    questions = tmp_path / "questions.txt"
    questions.write_text("Is ataxia-telangiectasia recessive?\n\nWhich gene causes it?\n")
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "questions", "format": "text", "path": str(questions)}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets, "ngramSize": 5})
    with pytest.raises(StageError, match=r"spec\.decontamination\.evalSets\[0\]: all 2 "
                       r"documents of evaluation set 'questions' .* are shorter than "
                       r"spec\.decontamination\.ngramSize \(5\) tokens \(the longest has 4\).*"
                       r"set a smaller ngramSize, or check that format 'text'"):
        stage.run(make_config(resource), resume=False)
    resource["spec"]["decontamination"]["ngramSize"] = 4
    metrics = stage.run(make_config(resource), resume=False)
    assert metrics["documentsOut"] > 0


def test_source_all_malformed_raises(make_config, tmp_path):
    """An object keyed by PMID whose entries lack CONTEXTS, like the PubMedQA ground-truth
    labels, passes the format guess, and its reader finds no document."""
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"21645374": "yes"}))
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN},
               {"name": "qa", "format": "pubmedqa", "path": str(answers)}]
    with pytest.raises(StageError, match=r"spec\.sources\[1\]\.format: all 1 records of 'qa'"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_empty_eval_set_raises(make_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "empty", "format": "jsonl", "path": str(empty)}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"evalSets\[0\]\.path: evaluation set 'empty' .* "
                       r"contains no documents"):
        stage.run(make_config(resource), resume=False)


@pytest.mark.parametrize(("source_format", "content"),
                         [("text", ""), ("jsonl", "\n\n"), ("pubmedqa", "{}")])
def test_source_without_records_raises(make_config, tmp_path, source_format, content):
    """A source that adds nothing fails the stage instead of leaving the corpus without it."""
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN},
               {"name": "notes", "format": source_format, "path": str(empty)}]
    with pytest.raises(StageError, match=rf"spec\.sources\[1\]\.path: source 'notes' "
                       rf"\('{re.escape(str(empty))}'\) contains no records for format "
                       rf"'{source_format}'.*point the path at the source data"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_pubtator_source_as_conll_raises(make_config):
    """The message names the configured format and the one the file looks like."""
    sources = [{"name": "bc5cdr", "format": "conll", "path": BC5CDR_TRAIN}]
    with pytest.raises(StageError) as raised:
        stage.run(make_config(_corpus(sources)), resume=False)
    message = str(raised.value)
    assert "spec.sources[0].format: source 'bc5cdr'" in message
    assert "has format 'conll'" in message
    assert message.endswith("; use format: pubtator.")
    assert ".." not in message


def _short_notes_error(make_config, tmp_path, text: str) -> StageError:
    """Run a Corpus of plain-text notes with minWords 5 and return the error it raises."""
    notes = tmp_path / "short.txt"
    notes.write_text(text)
    config = make_config(
        _corpus([{"name": "short", "format": "text", "path": str(notes)}], minWords=5)
    )
    with pytest.raises(StageError) as raised:
        stage.run(config, resume=False)
    return raised.value


def test_empty_result_raises_after_writing_stats(make_config, tmp_path):
    message = str(_short_notes_error(make_config, tmp_path, "too short\n\nalso short\n"))
    assert "spec.minWords: no documents remain after filtering 2 records: 2 are shorter " \
        "than minWords (5 words); lower minWords" in message, message
    assert message.endswith("stats.json has the counts of each filter."), message
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["removed"]["minWords"] == 2
    assert read_manifest(f"file://{tmp_path / 'out'}") is None


def test_single_short_record_message_singular(make_config, tmp_path):
    error = _short_notes_error(make_config, tmp_path, "too short\n")
    assert "filtering 1 record: 1 is shorter than minWords (5 words)" in str(error)


def test_decontaminated_corpus_names_eval_sets(make_config, data_dir):
    """A source that is the evaluation set itself loses every document to decontamination, and
    the error names the evaluation sets, not the sources."""
    test_split = {"name": "ncbi-test", "format": "ncbiDisease",
                  "path": "pubmed/ncbi-disease/corpus/NCBItestset_corpus.txt"}
    resource = _corpus([test_split], decontamination={"evalSets": [test_split]})
    with pytest.raises(StageError) as raised:
        stage.run(make_config(resource), resume=False)
    message = str(raised.value)
    assert "spec.decontamination.evalSets: no documents remain after filtering 100 " \
        "records: 100 overlap the evaluation sets" in message, message


NCBI_DEV = "pubmed/ncbi-disease/corpus/NCBIdevelopset_corpus.txt"


def _conll_sentences(path: Path) -> list[list[str]]:
    """Tokens per sentence of a CoNLL file, parsed here independently of the stage's reader."""
    blocks = path.read_text(encoding="utf-8").strip().split("\n\n")
    return [[line.split("\t")[0] for line in block.split("\n")] for block in blocks]


@pytest.fixture(scope="module")
def ncbi_eval_runs(data_dir, tmp_path_factory):
    """Run one corpus twice, with the NCBI test split as a `conll` and as an `ncbiDisease`
    evaluation set, and return {format: (stats, removed document ids)}.

    The sources are the NCBI test and development abstracts and the long sentences of the
    test abstracts, one per document. Those sentences keep the original punctuation
    (`IL-2 (receptor)`), which the CoNLL file has as separate tokens (`IL - 2 ( receptor )`).
    """
    tmp_path = tmp_path_factory.mktemp("ncbi-eval")
    abstracts = _pubtator_texts(data_dir / NCBI_TEST)
    sentences = [
        sentence
        for text in abstracts.values()
        for sentence in re.split(r"(?<=\.)\s+", text.replace("\n", " "))
        if len(sentence.split()) >= 20
    ]
    sentence_file = tmp_path / "sentences.jsonl"
    lines = [json.dumps({"id": f"s{i}", "text": text}) for i, text in enumerate(sentences)]
    sentence_file.write_text("\n".join(lines) + "\n")
    sources = [
        {"name": "test", "format": "ncbiDisease", "path": NCBI_TEST},
        {"name": "dev", "format": "ncbiDisease", "path": NCBI_DEV},
        {"name": "sentences", "format": "jsonl", "path": str(sentence_file)},
    ]
    eval_sets = {
        "conll": {"name": "ncbi-test", "format": "conll", "path": NCBI_CONLL_TEST},
        "ncbiDisease": {"name": "ncbi-test", "format": "ncbiDisease", "path": NCBI_TEST},
    }
    runs = {}
    for eval_format, eval_set in eval_sets.items():
        # Without deduplication every removal is decontamination's.
        resource = _corpus(sources, dedup={"exact": False, "near": {"enabled": False}},
                           decontamination={"evalSets": [eval_set]})  # fmt: skip
        output = tmp_path / eval_format
        config = stage_config(KINDS["Corpus"].model_validate(resource), {}, f"file://{output}",
                              str(data_dir))  # fmt: skip
        stage.run(config, resume=False)
        stats = json.loads((output / "stats.json").read_text())
        kept = {d["id"] for split in ("train", "validation")
                for d in iter_documents(str(output), split)}  # fmt: skip
        all_ids = {f"test:{pmid}" for pmid in abstracts}
        all_ids |= {f"dev:{pmid}" for pmid in _pubtator_texts(data_dir / NCBI_DEV)}
        all_ids |= {f"sentences:s{i}" for i in range(len(sentences))}
        runs[eval_format] = (stats, all_ids - kept, len(sentences))
    return runs


def test_conll_eval_set_removes_as_abstracts(ncbi_eval_runs):
    """The CoNLL sentences of the NCBI test split remove what its abstracts remove."""
    conll_stats, conll_removed, sentence_count = ncbi_eval_runs["conll"]
    abstract_stats, abstract_removed, _ = ncbi_eval_runs["ncbiDisease"]
    by_source = conll_stats["filters"][3]["removedBySource"]
    assert conll_stats["filters"][3]["name"] == "decontamination"
    assert by_source["test"] == 100
    assert by_source["sentences"] == sentence_count
    assert sentence_count > 400
    assert conll_removed == abstract_removed
    assert len(conll_removed) == conll_stats["removed"]["decontamination"]
    assert abstract_stats["removed"] == conll_stats["removed"]


def test_conll_eval_set_counts_add_up(ncbi_eval_runs, data_dir):
    stats, _, _ = ncbi_eval_runs["conll"]
    sentences = _conll_sentences(data_dir / NCBI_CONLL_TEST)
    tokens = [re.findall(r"\w+", " ".join(sentence).casefold()) for sentence in sentences]
    long_enough = [sentence for sentence in tokens if len(sentence) >= 13]
    ngrams = {" ".join(t[i:i + 13]) for t in long_enough for i in range(len(t) - 12)}
    [eval_set] = stats["evalSets"]
    assert eval_set["format"] == "conll"
    assert eval_set["documentsIn"] == len(sentences) == 940
    assert eval_set["malformed"] == 0
    assert eval_set["documentsIndexed"] == len(long_enough)
    assert eval_set["documentsTooShort"] == len(sentences) - len(long_enough)
    assert eval_set["ngrams"] == len(ngrams)


def _run_workers(make_config, resource: dict, output: Path, monkeypatch) -> dict:
    """Run every worker of `resource` in this process as the Job's pods would: workers 1 to
    W-1 first, then worker 0, which waits for their parts."""
    config = make_config(resource, output=output)
    monkeypatch.setenv("LATHE_RUN_ID", f"run-{output.name}")
    for worker in [*range(1, resource["spec"]["workers"]), 0]:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(worker))
        metrics = stage.run(config, resume=False)
    return metrics


def test_workers_write_the_same_corpus(make_config, data_dir, tmp_path, monkeypatch):
    """Near and exact duplicates whose copies fall to different workers are removed as by one
    worker, and the outputs are identical file by file."""
    abstracts = list(_pubtator_texts(data_dir / BC5CDR_TRAIN).values())[:40]
    notes = tmp_path / "notes.jsonl"
    records = [{"id": f"a{i}", "text": text} for i, text in enumerate(abstracts)]
    # Of three workers, worker 0 owns the originals (positions 0 and 3), and workers 1 and 2
    # own the exact copy (position 40) and the near copy with one word changed (position 41).
    records.append({"id": "exact", "text": abstracts[0]})
    words = abstracts[3].split()
    records.append({"id": "near", "text": " ".join(words[:-1] + ["changed"])})
    records.append({"id": "pii", "text": "Call 555-123-4567 about the MRN: 1234567 follow-up now."})
    notes.write_text("".join(json.dumps(record) + "\n" for record in records))
    resource = _corpus([{"name": "notes", "format": "jsonl", "path": str(notes)}], shards=2)
    single = stage.run(make_config(resource, output=tmp_path / "one"), resume=False)
    resource["spec"]["workers"] = 3
    shared = _run_workers(make_config, resource, tmp_path / "three", monkeypatch)
    manifests = [read_manifest(f"file://{tmp_path / name}") for name in ("one", "three")]
    assert shared["removed"]["exactDuplicates"] == 1
    assert shared["removed"]["nearDuplicates"] == 1
    assert shared["piiRedactions"] == {"mrn": 1, "phone": 1}
    assert shared == single
    assert manifests[0]["outputs"] == manifests[1]["outputs"]
    # The exchanged parts are no part of the artifact.
    assert not (tmp_path / "three" / "parts").exists()


def test_worker_index_beyond_workers_names_field(make_config, tmp_path, monkeypatch):
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"id": "n1", "text": "one two three four five six"}) + "\n")
    resource = _corpus([{"name": "notes", "format": "jsonl", "path": str(notes)}])
    resource["spec"]["workers"] = 2
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(StageError, match="spec.workers: this is worker 2, but spec.workers is 2"):
        stage.run(make_config(resource), resume=False)
