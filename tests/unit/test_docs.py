"""The docs quote the example files as they are."""

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
