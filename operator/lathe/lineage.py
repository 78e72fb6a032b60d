"""Follow manifests from a stage output back to the data files every stage read.

Each manifest records the URI and digest of every input it read. An input whose output was
rewritten since, by a stage that ran again on its own, has another digest now: the lineage then
shows the digest the stage recorded, which is what it was built from, and marks the change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lathe.errors import LatheError
from lathe_trainer.stage import MANIFEST, local_path
from lathe_trainer.training import storage


class LineageError(LatheError):
    """An output without a readable manifest."""


@dataclass(frozen=True)
class Node:
    """One stage output in the lineage: what its consumer recorded and what is there now."""

    depth: int
    kind: str
    name: str
    # The digest the consumer recorded, or the output's own digest at the top.
    digest: str
    manifest: dict | None
    # Why the output behind the recorded digest cannot be shown, or "".
    problem: str = ""
    # Whether the same output was shown earlier with its inputs, which are not repeated.
    repeated: bool = False


def find_output(path: str) -> Path:
    """Return the output directory that `path` names: the directory itself, a `file://` URI,
    or the stage directory that contains `output/`."""
    directory = local_path(path) if path.startswith("file://") else Path(path)
    if not (directory / MANIFEST).is_file() and (directory / "output" / MANIFEST).is_file():
        directory = directory / "output"
    return directory


def read(output: Path | str) -> dict:
    """Return the manifest of an output, a local directory or an s3:// URI; raise LineageError
    when it is unreadable."""
    path, text = _manifest_text(output)
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LineageError(f"{path} is not readable JSON ({error}); rerun the stage that "
                           "wrote it to rewrite it.") from error
    if not isinstance(manifest, dict) or not {"kind", "name", "digest"} <= manifest.keys():
        raise LineageError(f"{path} is not a Lathe manifest (it lacks kind, name or digest); "
                           "rerun the stage that wrote it to rewrite it.")
    problem = _shape_problem(manifest)
    if problem:
        raise LineageError(f"{path} is not a Lathe manifest ({problem}); rerun the stage that "
                           "wrote it to rewrite it.")
    return manifest


def _shape_problem(manifest: dict) -> str:
    """Return what is wrong with the parts of a manifest that lineage reads, or ""."""
    for key in ("inputs", "data", "metrics"):
        if not isinstance(manifest.get(key, {}), dict):
            return f"{key} is not an object"
    for role, item in (manifest.get("inputs") or {}).items():
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
            return f"input {role!r} has no uri"
    sources = (manifest.get("metrics") or {}).get("sourceDigests", {})
    if not isinstance(sources, dict):
        return "metrics.sourceDigests is not an object"
    return ""


def _manifest_text(output: Path | str) -> tuple[str, bytes]:
    if isinstance(output, str) and output.startswith("pvc://"):
        raise LineageError(f"{output} is on a PersistentVolumeClaim; read it where the claim is "
                           "mounted and pass that path.")
    if isinstance(output, str) and storage.is_remote(output):
        try:
            filesystem, base = storage.resolve(output)
            return f"{output}/{MANIFEST}", filesystem.cat_file(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            raise LineageError(f"{output} contains no {MANIFEST}; its stage has not "
                               "finished.") from None
        except (OSError, ValueError) as error:
            raise LineageError(f"{output} could not be read ({error}).") from error
    directory = local_path(output) if isinstance(output, str) else output
    path = directory / MANIFEST
    if not path.is_file():
        unfinished = _unfinished_stage(directory)
        if unfinished:
            raise LineageError(f"{directory} contains no {MANIFEST}: {unfinished}")
        where = "does not exist" if not directory.exists() else "contains no manifest.json"
        raise LineageError(
            f"{directory} {where}; pass the output directory of a finished stage: the "
            "file:// URI that `lathe run` prints after the stage's digest, or "
            "<workspace>/<namespace>/<kind>/<name>/output."
        )
    try:
        return str(path), path.read_bytes()
    except OSError as error:
        raise LineageError(f"{path} could not be read ({error}).") from error


def _unfinished_stage(directory: Path) -> str:
    """Return why the `lathe run` stage of `directory` (its stage or output directory) has no
    manifest, from the status.json the runner wrote. Return "" when there is none to read."""
    stage_dir = directory.parent if directory.name == "output" else directory
    try:
        written = json.loads((stage_dir / "status.json").read_text())
        phase = written["phase"]
        conditions = {c["type"]: c for c in written.get("conditions", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    log_file = stage_dir / "stage.log"
    if phase == "Failed":
        failed = conditions.get("Failed", {})
        detail = str(failed.get("message", "")).splitlines()
        reason = f" ({failed.get('reason')}: {detail[0]})" if detail else ""
        see = f" Its log is {log_file}." if log_file.is_file() else ""
        return (f"the stage failed{reason}, so it has no lineage yet.{see} Fix the cause and "
                "run `lathe run` again.")
    return (f"the stage has not finished (phase {phase}); run `lathe run` until it succeeds, "
            "then ask again.")


def walk(output_dir: Path) -> Iterator[Node]:
    """Yield the output and, depth first, every input it recorded."""
    manifest = read(output_dir)
    yield Node(0, manifest["kind"], manifest["name"], manifest["digest"], manifest)
    yield from _inputs(manifest, 1, set())


def _inputs(manifest: dict, depth: int, listed: set[tuple[str, str, str]]) -> Iterator[Node]:
    """Yield the inputs of `manifest` depth first. An input in `listed` (a PretrainJob and its
    Tokenizer both read the Corpus) is yielded once more without its own inputs."""
    for role, item in sorted((manifest.get("inputs") or {}).items()):
        kind, name = item.get("kind", role), item.get("name", "?")
        recorded = item.get("digest", "")
        try:
            found = read(item["uri"])
        except (LineageError, KeyError) as error:
            yield Node(depth, kind, name, recorded, None, f"not readable: {error}")
            continue
        if found["digest"] != recorded:
            # The output there now came from a later run, so its own inputs do not show
            # what this stage read.
            yield Node(depth, kind, name, recorded, None,
                       f"rewritten since: {item['uri']} now contains {found['digest']}")
            continue
        if (kind, name, recorded) in listed:
            yield Node(depth, kind, name, recorded, found, repeated=True)
            continue
        listed.add((kind, name, recorded))
        yield Node(depth, kind, name, recorded, found)
        yield from _inputs(found, depth + 1, listed)


def lineage_lines(output_dir: Path) -> Iterator[str]:
    for node in walk(output_dir):
        indent = "  " * node.depth
        line = f"{indent}{node.kind} {node.name}  {node.digest}"
        if node.repeated:
            yield f"{line}  (its inputs are listed above)"
            continue
        yield f"{line}  ({node.problem})" if node.problem else line
        if node.manifest is None:
            continue
        if "data" in node.manifest:
            for path, digest in sorted(node.manifest["data"].items()):
                yield f"{indent}  data {path}  {digest}"
            continue
        # Manifests written before data digests were recorded name a Corpus's sources only.
        sources = node.manifest.get("metrics", {}).get("sourceDigests", {})
        for name, digest in sorted(sources.items()):
            yield f"{indent}  source {name}  {digest}"
