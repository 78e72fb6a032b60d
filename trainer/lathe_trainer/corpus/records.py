"""Record types shared by the Corpus steps: a document, a malformed record, a read source."""

from __future__ import annotations

from dataclasses import dataclass, field

# How many malformed records per source are kept as examples in stats.json.
MAX_EXAMPLES = 5


@dataclass
class Document:
    """One document on its way through the Corpus steps."""

    id: str
    source: str
    record_id: str
    text: str


@dataclass(frozen=True)
class Malformed:
    """A record that could not be parsed, located so that someone can fix the file."""

    line: int | None
    record_id: str | None
    reason: str

    def to_json(self) -> dict:
        return {"line": self.line, "recordId": self.record_id, "reason": self.reason}


@dataclass
class SourceRead:
    """The documents and the malformed records read from one source file."""

    documents: list[Document] = field(default_factory=list)
    malformed_count: int = 0
    malformed_examples: list[Malformed] = field(default_factory=list)

    def add_malformed(self, record: Malformed) -> None:
        self.malformed_count += 1
        if len(self.malformed_examples) < MAX_EXAMPLES:
            self.malformed_examples.append(record)

    @property
    def records(self) -> int:
        """Records read, parsed or not: the source's `documentsIn`."""
        return len(self.documents) + self.malformed_count
