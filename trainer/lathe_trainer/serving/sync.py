"""Copy a ModelDeployment's Triton model repository into the Triton pod, checked file by file.

The init container of every Triton pod runs `python -m lathe_trainer.serving.sync`. A new
export writes into the same output location, so a pod that starts while it runs (a crash, a
scale-up) could otherwise copy a half-written repository. Here the copy must match the export's
manifest: each file's SHA-256 against the manifest's `outputs`, and the manifest's digest against
the one the Deployment's pod template names. On a mismatch the container exits 1, and the kubelet
restarts it with back-off until the export has finished and the Deployment names the new digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from lathe_trainer.stage import MANIFEST
from lathe_trainer.training import storage

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20


class SyncError(RuntimeError):
    """The repository does not match the export manifest (yet)."""


def sync(output_uri: str, repository: str, destination: Path, expected_digest: str = "") -> int:
    """Copy `<output_uri>/<repository>/` into `destination`, checked against the manifest.

    Returns the number of files copied. Raises SyncError when the export has no manifest or its
    digest is not `expected_digest` (if given), and when a file differs from the manifest.
    """
    filesystem, base = storage.resolve(output_uri)
    manifest = _read_manifest(filesystem, base, output_uri)
    if expected_digest and manifest["digest"] != expected_digest:
        raise SyncError(
            f"the export at {output_uri} has digest {manifest['digest']}, but this pod expects "
            f"{expected_digest}; a newer export has finished, and the operator rolls the "
            "Deployment to it."
        )
    prefix = f"{repository.strip('/')}/"
    expected = {path[len(prefix):]: digest for path, digest in manifest["outputs"].items()
                if path.startswith(prefix)}
    if not expected:
        raise SyncError(f"the manifest of {output_uri} lists no file under {prefix}; rerun the "
                        "ModelDeployment's export.")
    source = f"{base}/{repository.strip('/')}"
    found = {path[len(source):].lstrip("/") for path in filesystem.find(source)}
    if found != expected.keys():
        extra, missing = sorted(found - expected.keys()), sorted(expected.keys() - found)
        raise SyncError(f"the repository at {output_uri} does not match its manifest (files "
                        f"not listed: {extra[:5]}, listed but missing: {missing[:5]}); an "
                        "export is probably writing it.")
    for relative, digest in sorted(expected.items()):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        actual = _copy(filesystem, f"{source}/{relative}", target)
        if actual != digest:
            raise SyncError(f"{relative} of {output_uri} has digest {actual}, the manifest "
                            f"lists {digest}; an export is probably writing it.")
    log.info("Copied %d files of %s (export %s) to %s.", len(expected), source,
             manifest["digest"], destination)
    return len(expected)


def _read_manifest(filesystem, base: str, output_uri: str) -> dict:
    try:
        manifest = json.loads(filesystem.cat_file(f"{base}/{MANIFEST}"))
    except FileNotFoundError:
        raise SyncError(f"{output_uri} has no {MANIFEST}: its export has not finished, or a new "
                        "export is running.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise SyncError(f"{output_uri}/{MANIFEST} is not valid JSON ({error}); rerun the "
                        "export.") from error
    if not isinstance(manifest, dict) or not {"digest", "outputs"} <= manifest.keys():
        raise SyncError(f"{output_uri}/{MANIFEST} lacks digest or outputs; rerun the export.")
    return manifest


def _copy(filesystem, source: str, target: Path) -> str:
    """Copy one file and return the SHA-256 of the bytes copied, in the manifest's format."""
    digest = hashlib.sha256()
    with filesystem.open(source, "rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    return "sha256:" + digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lathe_trainer.serving.sync",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("output", help="URI of the export output (file://, s3://).")
    parser.add_argument("destination", type=Path, help="Directory Triton reads, such as /models.")
    parser.add_argument("--repository", default="model_repository",
                        help="Repository directory under the output (default: model_repository).")
    parser.add_argument("--digest", default="",
                        help="Digest the export must have, from the pod template; empty skips it.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        sync(args.output, args.repository, args.destination, args.digest)
    except SyncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
