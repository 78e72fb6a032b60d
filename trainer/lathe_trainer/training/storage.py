"""Artifact store URLs for checkpoints and the final model, through fsspec.

`file://` and plain paths are local. `pvc://<claim>/<path>` is a PersistentVolumeClaim that the
operator mounts at `<LATHE_ARTIFACTS_MOUNT>/<claim>` (default /artifacts, the mount point in
lathe.k8s.builders), so it is local inside the pod too. Any other scheme (s3://, gs://, and
memory:// in tests) goes to the fsspec filesystem of that protocol, which must be installed.
s3:// goes through obstore's fsspec store (the Rust object_store crate), configured from the
usual AWS_* variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...): s3fs cannot be
installed beside kubernetes 37, whose python-dateutil>=3 botocore rejects.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import obstore.fsspec
from fsspec.implementations.local import LocalFileSystem

DEFAULT_ARTIFACTS_MOUNT = "/artifacts"

obstore.fsspec.register("s3")


def to_fsspec_url(uri: str | os.PathLike[str]) -> str:
    """Rewrite a pvc:// URI to the mounted local path; return other URIs unchanged."""
    uri = os.fspath(uri)
    if uri.startswith("pvc://"):
        claim, _, path = uri[len("pvc://"):].partition("/")
        if not claim:
            raise ValueError(f"URI {uri!r} names no claim; use pvc://<claim>/<path>.")
        mount = os.environ.get("LATHE_ARTIFACTS_MOUNT", DEFAULT_ARTIFACTS_MOUNT)
        return str(Path(mount) / claim / path)
    return uri


def resolve(uri: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem behind `uri` and the path inside it."""
    url = to_fsspec_url(uri)
    try:
        filesystem, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise ValueError(
            f"no filesystem for {url!r} ({error}); the trainer reads and writes file://, "
            "pvc:// and s3:// URIs, so use one of those."
        ) from error
    return filesystem, path.rstrip("/") or path


def is_remote(uri: str) -> bool:
    """Return True for a URI that names an object store rather than a local path."""
    return "://" in uri and not uri.startswith("file://")


def is_local(filesystem: fsspec.AbstractFileSystem) -> bool:
    return isinstance(filesystem, LocalFileSystem)


def display(filesystem: fsspec.AbstractFileSystem, path: str) -> str | Path:
    """Return a local Path for local files, else the full URL, for logs and return values."""
    return Path(path) if is_local(filesystem) else filesystem.unstrip_protocol(path)


def move_tree(filesystem: fsspec.AbstractFileSystem, source: str, destination: str,
              last: str | None = None) -> None:
    """Move a directory: one atomic rename on a local disk, else a copy of each file and a
    delete, because object stores have no directories to rename.

    On an object store the file named `last` is copied after all others, so that a reader
    that waits for it never reads a half-copied directory.
    """
    if is_local(filesystem):
        os.rename(source, destination)
        return
    paths = sorted(filesystem.find(source))
    if last is not None:
        paths.sort(key=lambda path: path.rpartition("/")[2] == last)
    for path in paths:
        relative = path[len(source):].lstrip("/")
        filesystem.copy(path, f"{destination}/{relative}")
    remove_tree(filesystem, source)


def remove_tree(filesystem: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete a directory and everything under it; a directory already gone is no error.

    NB: some S3-compatible stores (SeaweedFS 4.53) keep listing a prefix for a while after its
    last object is deleted, and fsspec raises FileNotFoundError when asked to delete it.
    """
    try:
        filesystem.rm(path, recursive=True)
    except FileNotFoundError:
        pass
