"""The docs quote the example files as they are, and list every spec field as the models define it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESOURCES = REPO / "docs" / "resources.md"
QUOTED = re.compile(r"^`(examples/[\w./-]+\.yaml)`:\n\n```yaml\n(.*?)```", re.MULTILINE | re.DOTALL)


def quoted_examples() -> list[tuple[str, str]]:
    return QUOTED.findall(RESOURCES.read_text())


def test_every_example_quoted():
    quoted = {path for path, _ in quoted_examples()}
    files = {path.relative_to(REPO).as_posix()
             for path in (REPO / "examples" / "pubmed").glob("*.yaml")}  # fmt: skip
    assert quoted == files


@pytest.mark.parametrize(("path", "block"), quoted_examples(), ids=lambda item: str(item)[:40])
def test_quoted_example_matches_file(path, block):
    assert block == (REPO / path).read_text(), f"docs/resources.md quotes an old {path}"


def generated_tables() -> dict[str, str]:
    """Return {kind: field table} as scripts/docs/field_tables.py prints them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "field_tables", REPO / "scripts" / "docs" / "field_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {kind: module.table(kind) for kind in module.KINDS}


@pytest.mark.parametrize("kind", ["Corpus", "Tokenizer", "PretrainJob", "FineTune",
                                  "ModelDeployment"])
def test_field_table_matches_models(kind):
    """Each kind's table in docs/resources.md is what the table script prints from the API
    models. After an API change, rerun the script and paste the table."""
    table = generated_tables()[kind]
    assert table in RESOURCES.read_text(), (
        f"docs/resources.md has an old {kind} field table; rerun "
        "scripts/docs/field_tables.py and paste it"
    )


def test_cel_rule_table_matches_models():
    """docs/crds.md lists every CEL rule the CRDs carry, as the table script prints them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "field_tables", REPO / "scripts" / "docs" / "field_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cel_table() in (REPO / "docs" / "crds.md").read_text(), (
        "docs/crds.md has an old CEL rule table; rerun scripts/docs/field_tables.py and paste it"
    )


def test_corpus_record_fields_documented(tmp_path):
    """The Corpus output paragraph names every field of a shard record, such as the `quality`
    score that a PretrainJob curriculum filters on."""
    import json

    from lathe_trainer.corpus.records import Document
    from lathe_trainer.corpus.split import Assignment, write_shards

    document = Document(id="notes:1", source="notes", record_id="1", text="Aspirin lowers fever.")
    write_shards(tmp_path, [document], [Assignment(split="train", shard=0)], shards=1)
    record = json.loads((tmp_path / "train" / "shard-00000.jsonl").read_text())
    paragraph = RESOURCES.read_text().split("Output: `train/shard-NNNNN.jsonl`", 1)[1]
    paragraph = paragraph.split("\n\n", 1)[0]

    for key in record:
        assert f"`{key}`" in paragraph, key
