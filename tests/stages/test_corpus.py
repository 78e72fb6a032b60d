"""The Corpus stage on the real PubMed sources of the example, and on broken copies of them.

The example run (7 sources, about 3,300 documents) happens once per module; the other tests use
small copies written under tmp_path.
"""

from __future__ import annotations

import json
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


def test_source_in_wrong_format_raises(make_config):
    sources = [{"name": "wrong", "format": "pubmedqa", "path": BC5CDR_TRAIN}]
    with pytest.raises(StageError, match=r"spec\.sources\[0\]\.format: file .* is not UTF-8 JSON"):
        stage.run(make_config(_corpus(sources)), resume=False)


def test_eval_set_in_wrong_format_raises(make_config):
    """An evaluation set read in the wrong format would remove nothing and leave the test
    documents in training, so it fails the stage instead."""
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN}]
    eval_sets = [{"name": "ncbi-test", "format": "jsonl", "path": NCBI_TEST}]
    resource = _corpus(sources, decontamination={"evalSets": eval_sets})
    with pytest.raises(StageError, match=r"spec\.decontamination\.evalSets\[0\]\.format: all "
                       r"\d+ records of 'ncbi-test' .* are malformed for format 'jsonl'"):
        stage.run(make_config(resource), resume=False)


def test_source_all_malformed_raises(make_config, data_dir, tmp_path):
    data = json.loads((data_dir / PUBMEDQA).read_text())
    one = tmp_path / "one.json"
    one.write_text(json.dumps({pmid: data[pmid] for pmid in list(data)[:1]}))
    sources = [{"name": "bc5cdr", "format": "pubtator", "path": BC5CDR_TRAIN},
               {"name": "qa", "format": "pubtator", "path": str(one)}]
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


def test_empty_result_raises_after_writing_stats(make_config, tmp_path):
    notes = tmp_path / "short.txt"
    notes.write_text("too short\n\nalso short\n")
    config = make_config(
        _corpus([{"name": "short", "format": "text", "path": str(notes)}], minWords=5)
    )
    with pytest.raises(StageError, match=r"spec\.sources: no documents remain after filtering 2"):
        stage.run(config, resume=False)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["removed"]["minWords"] == 2
    assert read_manifest(f"file://{tmp_path / 'out'}") is None


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
