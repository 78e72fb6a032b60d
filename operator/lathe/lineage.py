"""Follow manifests from a stage output back to the corpus sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lathe_trainer.stage import local_path, read_manifest


def walk(output_dir: Path, depth: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield (depth, manifest) for a stage output and, recursively, every input it used."""
    manifest = read_manifest(str(output_dir))
    if manifest is None:
        raise FileNotFoundError(
            f"No manifest.json in {output_dir}; pass the output directory of a finished stage."
        )
    yield depth, manifest
    for item in manifest.get("inputs", {}).values():
        yield from walk(local_path(item["uri"]), depth + 1)


def lineage_lines(output_dir: Path) -> Iterator[str]:
    for depth, manifest in walk(output_dir):
        indent = "  " * depth
        yield f"{indent}{manifest['kind']} {manifest['name']}  {manifest['digest']}"
        for name, digest in sorted(manifest.get("metrics", {}).get("sourceDigests", {}).items()):
            yield f"{indent}  source {name}  {digest}"
