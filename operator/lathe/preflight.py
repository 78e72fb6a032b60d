"""Checks that `lathe validate` and `lathe run` make before anything runs.

Every file a spec names must exist, and no local data file may be empty or in another format
than declared. Every protected pattern must compile in the tokenizer's regex engine. Each
resource must also fit the resources it references (lathe.consistency).
"""

from __future__ import annotations

import difflib
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lathe.api import Corpus, FineTune, ModelDeployment, Resource, Tokenizer
from lathe.api.tokenizer import oniguruma_rejection
from lathe.errors import InvalidResourceError, raise_errors
from lathe_trainer.corpus.sniff import (
    conll_mismatch_message,
    format_mismatch,
    has_content,
    mismatch_message,
)
from lathe_trainer.datasets import conll_columns, is_docstart, is_iob_tag
from lathe_trainer.stage import combined_digest, digest_outputs, sha256_file

# Lines of a FineTune or ModelDeployment CoNLL file read before the run, so that the check
# costs the same for any file size. The stage reads every line.
CONLL_CHECK_LINES = 1000


def _named_paths(resource: Resource) -> Iterator[tuple[str, str]]:
    """Yield (field, path) for every data file the resource names."""
    match resource:
        case Corpus():
            for index, source in enumerate(resource.spec.sources):
                yield f"spec.sources[{index}].path", source.path
            for index, source in enumerate(resource.spec.decontamination.eval_sets):
                yield f"spec.decontamination.evalSets[{index}].path", source.path
        case Tokenizer():
            for index, pattern in enumerate(resource.spec.protected_patterns):
                if pattern.vocabulary_file:
                    yield (f"spec.protectedPatterns[{index}].vocabularyFile",
                           pattern.vocabulary_file)
        case FineTune():
            data = resource.spec.data
            yield "spec.data.train", data.train
            yield "spec.data.test", data.test
            if data.validation:
                yield "spec.data.validation", data.validation
        case ModelDeployment():
            if resource.spec.export.held_out_data:
                yield "spec.export.heldOutData", resource.spec.export.held_out_data


def resolve(path: str, data_dir: Path) -> Path:
    if path.startswith("file://"):
        return Path(path[len("file://"):])
    candidate = Path(path)
    return candidate if candidate.is_absolute() else data_dir / candidate


def is_local(path: str) -> bool:
    """Return True for a path in the data directory or a file:// URI, not an object store."""
    return "://" not in path or path.startswith("file://")


def data_digests(resource: Resource, data_dir: Path) -> dict[str, str]:
    """Return {field: sha256 digest} of the local data files and directories the resource
    names.

    A directory, a FineTune's baseModel.uri, gets the digest a stage output gets, so a model
    rewritten in place under the same path reruns the FineTune. Paths on object stores are
    left out, because reading them to hash them would cost a download on every run.
    """
    check_files(resource, data_dir)  # a file removed since the check gets the same error
    digests = {}
    for field, path in _data_uris(resource):
        resolved = resolve(path, data_dir)
        if not is_local(path):
            continue
        if resolved.is_file():
            digests[field] = sha256_file(resolved)
        elif resolved.is_dir():
            digests[field] = combined_digest(digest_outputs(resolved))
    return digests


def _data_uris(resource: Resource) -> Iterator[tuple[str, str]]:
    """Yield (field, path) for every data file and data directory the resource names."""
    yield from _named_paths(resource)
    if isinstance(resource, FineTune) and resource.spec.base_model.uri:
        yield "spec.baseModel.uri", resource.spec.base_model.uri


def unchecked_paths(resource: Resource) -> list[tuple[str, str]]:
    """Return (field, path) for the object store paths the checks do not read."""
    return [(field, path) for field, path in _data_uris(resource) if not is_local(path)]


def _reject_claim(resource: Resource, field: str, uri: str | None, fix: str) -> None:
    """Raise for a pvc:// URI, which `lathe run` cannot reach."""
    if uri and uri.startswith("pvc://"):
        raise InvalidResourceError(
            resource.label, field,
            f"{uri!r} names a PersistentVolumeClaim, which exists only in a cluster; for "
            f"`lathe run`, {fix}.",
        )


def check_files(resource: Resource, data_dir: Path) -> None:
    """Check that every local data file exists and that no data path needs a cluster."""
    training = getattr(resource.spec, "training", None)
    _reject_claim(resource, "spec.training.artifactUri",
                  training.artifact_uri if training is not None else None,
                  "leave it unset (the workspace) or use file:///absolute/path or "
                  "s3://<bucket>/<prefix>")
    for field, path in _data_uris(resource):
        _reject_claim(resource, field, path,
                      "use a path under the data directory (--data-dir), file:///absolute/path "
                      "or s3://<bucket>/<key>")
    if isinstance(resource, FineTune) and is_local(resource.spec.base_model.uri or "://"):
        model = resolve(resource.spec.base_model.uri, data_dir)
        if not (model / "config.json").is_file():
            problem = "does not exist" if not model.exists() else "has no config.json"
            raise InvalidResourceError(
                resource.label, "spec.baseModel.uri",
                f"model directory {str(model)!r} {problem}; point it at a Hugging Face model "
                "directory, such as a PretrainJob's output/model, or use "
                "spec.baseModel.pretrainJobRef.",
            )
    for field, path in _named_paths(resource):
        if not is_local(path):
            continue
        resolved = resolve(path, data_dir)
        if resolved.is_file():
            continue
        if not Path(path).is_absolute() and not path.startswith("file://") and (
            not data_dir.is_dir()
        ):
            state = "is a file, not a folder" if data_dir.exists() else "does not exist"
            raise InvalidResourceError(
                resource.label, field,
                f"{path!r} is relative to the data directory, and {str(data_dir)!r} {state}; "
                "pass the folder that contains the data with --data-dir or LATHE_DATA_DIR.",
            )
        problem = "is a directory, not a file" if resolved.is_dir() else "does not exist"
        if path.startswith("file:/") and not path.startswith("file://"):
            raise InvalidResourceError(
                resource.label, field,
                f"{path!r} is read as a path relative to the data directory, because only "
                f"file:// starts a URI here; write 'file://{path[len('file:'):]}' for the "
                "absolute path.",
            )
        if path.startswith("file://") or Path(path).is_absolute():
            raise InvalidResourceError(
                resource.label, field,
                f"file {path!r} {problem}; fix the path"
                f"{_decoded_hint(path) or _close_file(path, resolved)}.",
            )
        raise InvalidResourceError(
            resource.label,
            field,
            f"file {path!r} {problem} under the data directory {str(data_dir)!r}; fix the "
            f"path{_close_file(path, resolved)} or pass the right folder with --data-dir.",
        )


def _decoded_hint(path: str) -> str:
    """Return a hint for a file:// URI written percent-encoded (`%20` for a space) whose
    decoded path exists, or "".

    Lathe reads a file:// path literally, as fsspec does, so `%20` is the three characters.
    """
    if not path.startswith("file://") or "%" not in path:
        return ""
    decoded = urllib.parse.unquote(path[len("file://"):])
    if decoded == path[len("file://"):] or not Path(decoded).exists():
        return ""
    return (f" (file:// paths are read as written, without percent-decoding, so write "
            f"'file://{decoded}')")


def _close_file(path: str, resolved: Path) -> str:
    """Return " (did you mean 'x'?)" for a file next to `resolved` with a similar name, or ""."""
    try:
        names = [entry.name for entry in resolved.parent.iterdir() if entry.is_file()]
    except OSError:
        return ""
    # A shortened name, such as DevSet for DevelopmentSet, keeps its letters in order, and
    # difflib would rank a name of similar length above it.
    shortened = sorted((name for name in names if _in_order(resolved.name.lower(), name.lower())),
                       key=len)
    close = shortened[:1] or difflib.get_close_matches(resolved.name, names, n=1, cutoff=0.7)
    if not close:
        return ""
    # The folder is cut from the string, because Path would shorten file:/// to file:/.
    folder, slash, _ = path.rpartition("/")
    return f" (did you mean {folder + slash + close[0]!r}?)"


def _in_order(short: str, name: str) -> bool:
    """Return whether `name` has the first character and the extension of `short`, and every
    character of `short` in the same order, and is at most twice as long."""
    if not short or short[0] != name[0] or Path(short).suffix != Path(name).suffix:
        return False
    if 2 * len(short) < len(name):
        return False  # too little of the name was given to call it a shortened form
    remaining = iter(name)
    return all(character in remaining for character in short)


def check_patterns(resource: Resource) -> None:
    """Compile a Tokenizer's protected patterns in Oniguruma, the regex engine of `tokenizers`.

    The API model compiles them with Python's `re` and the `regex` module only, because the
    operator does not install `tokenizers`. Oniguruma rejects some Python-only syntax, which would otherwise fail the
    Tokenizer stage after its Corpus ran.
    """
    if not isinstance(resource, Tokenizer):
        return
    from tokenizers import Regex

    for index, pattern in enumerate(resource.spec.protected_patterns):
        try:
            Regex(pattern.regex)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise InvalidResourceError(
                resource.label, f"spec.protectedPatterns[{index}].regex",
                oniguruma_rejection(pattern.regex, error),
            ) from None


@dataclass(frozen=True)
class _FormattedFile:
    """A data file that a stage reads in a declared format."""

    path_field: str
    format_field: str
    path: str
    declared: str
    # The role and name of a Corpus source or evaluation set, such as "source 'notes'"; None
    # for the CoNLL files of a FineTune or ModelDeployment, which have no format of their own.
    entry: str | None = None


def _formatted_files(resource: Resource) -> Iterator[_FormattedFile]:
    match resource:
        case Corpus():
            entries = [("spec.sources", "source", resource.spec.sources),
                       ("spec.decontamination.evalSets", "evaluation set",
                        resource.spec.decontamination.eval_sets)]
            for field, role, sources in entries:
                for index, source in enumerate(sources):
                    yield _FormattedFile(f"{field}[{index}].path", f"{field}[{index}].format",
                                         source.path, source.format, f"{role} {source.name!r}")
        case FineTune():
            data = resource.spec.data
            for name in ("train", "validation", "test"):
                path = getattr(data, name)
                if path:
                    yield _FormattedFile(f"spec.data.{name}", f"spec.data.{name}", path,
                                         data.format)
        case ModelDeployment():
            path = resource.spec.export.held_out_data
            yield _FormattedFile("spec.export.heldOutData", "spec.export.heldOutData", path,
                                 "conll")


def check_data_formats(resource: Resource, data_dir: Path) -> None:
    """Check that no local data file is empty or, by its first lines, in another format.

    The stages make the same checks, after their upstream stages ran. Files that do not exist
    are left to check_files, and files on object stores to the stage, which downloads them.
    """
    for item in _formatted_files(resource):
        if not is_local(item.path):
            continue
        resolved = resolve(item.path, data_dir)
        if not resolved.is_file():
            continue
        if not has_content(resolved):
            raise InvalidResourceError(resource.label, item.path_field,
                                       _empty_message(item, resolved))
        guess = format_mismatch(resolved, item.declared)
        if guess is None:
            if item.entry is None:
                _check_conll_lines(resource, item, resolved)
            continue
        if item.entry is None:
            message = conll_mismatch_message(item.path, guess)
        else:
            message = mismatch_message(item.entry, item.path, item.declared, guess)
        raise InvalidResourceError(resource.label, item.format_field, message)


def _check_conll_lines(resource: Resource, item: _FormattedFile, resolved: Path) -> None:
    """Raise for the first malformed line among the first CONLL_CHECK_LINES of a CoNLL file
    that a FineTune or ModelDeployment reads, with the stage's reason."""
    with resolved.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if number > CONLL_CHECK_LINES:
                return
            line = line.rstrip("\r\n")
            if not line.strip() or is_docstart(line):
                continue
            try:
                _, tag = conll_columns(line)
            except ValueError as error:
                raise InvalidResourceError(
                    resource.label, item.path_field,
                    f"{item.path}:{number}: {error}; fix the file or the path.",
                ) from None
            # Only the FineTune stage rejects other tags; the export decodes held-out tags as
            # they are.
            if isinstance(resource, FineTune) and not is_iob_tag(tag):
                raise InvalidResourceError(
                    resource.label, item.path_field,
                    f"{item.path}:{number}: the tag {tag!r} is not `O`, `B-<type>` or "
                    "`I-<type>` (IOB), the tags that a FineTune trains on; convert the file to "
                    "IOB (IOBES `S-` to `B-`, `E-` to `I-`), or fix the path.",
                )


def _empty_message(item: _FormattedFile, resolved: Path) -> str:
    path_text = (repr(item.path) if str(resolved) == item.path
                 else f"{item.path!r}, '{resolved}'")
    if item.entry is None:
        return (f"file {path_text} is empty; point it at a CoNLL file (`token<TAB>tag` or "
                "`token tag` lines, a blank line between sentences).")
    if item.entry.startswith("evaluation set"):
        return (f"{item.entry} ({path_text}) is empty, so nothing would be removed for it; point "
                "the path at the evaluation data, or remove the entry.")
    return (f"{item.entry} ({path_text}) is empty, so it would add no records to the corpus; "
            "point the path at the source data, or remove the entry.")


def check_resources(resources: list[Resource], data_dir: Path,
                    upstream: Iterable[Resource] = ()) -> None:
    """Run the checks that read data files or compare resources with each other.

    `upstream` holds resources that are not run but are referenced, as they ran before; they
    are compared with the resources that reference them, and not checked themselves. Call it
    after check_files passed for every resource, so that a missing file is reported as missing.
    """
    from lathe import consistency  # it imports this module

    errors = []
    for resource in resources:
        try:
            check_data_formats(resource, data_dir)
        except InvalidResourceError as error:
            errors.append(error)
    raise_errors(errors)
    consistency.check_references(resources, data_dir, upstream)
