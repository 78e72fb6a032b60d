"""Read resource files (YAML, one or more documents each) into API models.

Validation errors from pydantic are turned into InvalidResourceError messages that name the file,
the resource, the field (in its camelCase wire form) and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lathe.api import API_VERSION, KINDS, Resource
from lathe.errors import InvalidResourceError

RESOURCE_SUFFIXES = (".yaml", ".yml")


# Kubernetes ObjectMeta fields (k8s.io/apimachinery, meta/v1), as `kubectl get -o yaml` writes them.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})


def field_path(location: tuple[Any, ...]) -> str:
    """Render a pydantic error location as `spec.sources[0].path`."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    location = tuple(part for part in error["loc"] if part not in KINDS)
    # Tagged unions and Literal kinds prefix the location with the model name; drop it.
    field = field_path(location)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return field, f"unknown field {field.rsplit('.', 1)[-1]!r}; remove it or fix its spelling."
    if error["type"] == "missing":
        return field, "required field is missing; add it."
    # A validator's own message is the fix; pydantic prefixes it with "Value error, ".
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    return field, f"invalid value {value!r}: {message}; correct the value."


def parse_resource(document: dict[str, Any], origin: str) -> Resource:
    if not isinstance(document, dict):
        raise InvalidResourceError(origin, "(document)", "expected a mapping with apiVersion, "
                                   "kind, metadata and spec.")
    kind = document.get("kind")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}  # pydantic reports the missing or wrongly typed metadata below
    name = metadata.get("name", "<unnamed>")
    label = f"{kind or '<no kind>'} {name!r} in {origin}"
    if document.get("apiVersion") != API_VERSION:
        raise InvalidResourceError(
            label, "apiVersion",
            f"invalid value {document.get('apiVersion')!r}; set it to {API_VERSION!r}.",
        )
    if kind not in KINDS:
        raise InvalidResourceError(
            label, "kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}."
        )
    unknown = sorted(str(key) for key in metadata if key not in OBJECT_META_FIELDS)
    if unknown:
        # The API server would drop an unknown metadata field, so a misspelled `namespace`
        # would silently land the resource in another namespace.
        raise InvalidResourceError(
            label, f"metadata.{unknown[0]}",
            f"unknown field {unknown[0]!r}; remove it or fix its spelling (metadata takes "
            "name, namespace, labels and annotations).",
        )
    try:
        return KINDS[kind].model_validate(document)
    except ValidationError as error:
        problems = [_describe(item) for item in error.errors()]
        field, message = problems[0]
        if len(problems) > 1:
            # Every problem at once, so a user does not fix them one run at a time.
            message += " Also: " + " ".join(f"{other}: {text}" for other, text in problems[1:])
        raise InvalidResourceError(label, field, message) from None


def load_file(path: Path) -> list[Resource]:
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as error:
        raise InvalidResourceError(str(path), "(file)", f"invalid YAML: {error}") from None
    resources = [parse_resource(document, str(path)) for document in documents if document]
    for resource in resources:
        resource._origin = str(path)
    return resources


def load_paths(paths: list[Path]) -> list[Resource]:
    """Load every resource file named, or found directly inside a named folder."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in RESOURCE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidResourceError(str(path), "-f", "file or folder does not exist; "
                                       "pass an existing path.")
    resources = [resource for file in files for resource in load_file(file)]
    if not resources:
        names = ", ".join(str(path) for path in paths)
        raise InvalidResourceError(names, "-f", "no resources found; pass .yaml files or a "
                                   "folder that contains them.")
    seen: dict[str, Resource] = {}
    for resource in resources:
        if resource.key in seen:
            raise InvalidResourceError(
                resource.label, "metadata.name",
                f"defined twice, also as {seen[resource.key].label}; give each resource its own "
                "name.",
            )
        seen[resource.key] = resource
    return resources
