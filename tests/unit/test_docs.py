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
