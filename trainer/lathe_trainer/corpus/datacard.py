"""The data card of a Corpus: a short Markdown summary of sources, filters and counts.

It is rendered from the stats.json dictionary, so the card and the statistics never disagree.
"""

from __future__ import annotations

from typing import Any

_FILTER_TEXT = {
    "minWords": "fewer words than `minWords`",
    "exactDuplicates": "exact duplicates of an earlier document (after normalization)",
    "nearDuplicates": "near duplicates of an earlier document (word-shingle Jaccard)",
    "decontamination": "sharing a word n-gram with an evaluation set",
}


def render(name: str, spec: dict[str, Any], stats: dict[str, Any]) -> str:
    """Return the data card of Corpus `name` from its spec (wire form) and stats."""
    lines = [
        f"# Data card: Corpus {name}",
        "",
        f"{stats['documentsOut']} documents out of {stats['documentsIn']} records read "
        f"({stats['splits']['train']['documents']} train, "
        f"{stats['splits']['validation']['documents']} validation).",
        "",
        "## Sources",
        "",
        "| source | format | path | records | malformed | kept | sha256 |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for source in stats["sources"]:
        lines.append(
            f"| {source['name']} | {source['format']} | `{source['path']}` | "
            f"{source['documentsIn']} | {source['malformed']} | {source['documentsOut']} | "
            f"`{source['sha256'].removeprefix('sha256:')[:16]}` |"
        )
    lines += ["", "## Filters, in order", ""]
    lines += ["| step | removed | what it removes |", "|---|---:|---|"]
    lines.append(f"| malformed records | {stats['malformed']} | records that do not parse |")
    for step in stats["filters"]:
        lines.append(f"| {step['name']} | {step['removed']} | {_FILTER_TEXT[step['name']]} |")
    lines += ["", "## Processing", ""]
    lines += _processing(spec, stats)
    return "\n".join(lines) + "\n"


def _processing(spec: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    normalization = spec["normalization"]
    near = spec["dedup"]["near"]
    decontamination = spec["decontamination"]
    split = spec["split"]
    eval_sets = ", ".join(
        f"`{item['path']}` ({item['format']}: {item['documentsIndexed']} documents with "
        f"{item['ngrams']} n-grams, {item['documentsTooShort']} shorter than an n-gram)"
        for item in stats["evalSets"]
    ) or "none"
    redactions = ", ".join(f"{kind} {count}" for kind, count in stats["piiRedactions"].items())
    return [
        f"- Normalization: Unicode {normalization['unicodeForm']}, whitespace collapsed: "
        f"{'yes' if normalization['collapseWhitespace'] else 'no'}. Digits and codes are kept.",
        f"- Near duplicates: {'on' if near['enabled'] else 'off'}, Jaccard >= {near['threshold']} "
        f"over {near['shingleSize']}-word shingles, MinHash LSH with {near['numPerm']} "
        "permutations; the first document of each group is kept.",
        f"- Decontamination: {decontamination['ngramSize']}-token n-gram overlap with {eval_sets}.",
        f"- PII redacted ({', '.join(spec['pii']['redact']) or 'none'}): "
        f"{redactions or 'nothing found'}, in {stats['piiDocuments']} documents.",
        f"- Split: validation fraction {split['validationFraction']}, seed {split['seed']}, "
        f"assigned by a hash of the document id; {spec['shards']} shards per split.",
    ]
