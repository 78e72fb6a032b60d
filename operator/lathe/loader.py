"""Read resource files (YAML, one or more documents each) into API models.

Validation errors from pydantic are turned into InvalidResourceError messages that name the file,
the resource, the field (in its camelCase wire form) and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lathe.api import API_VERSION, KINDS, Resource
from lathe.api.common import RULE_ERROR, ObjectMeta, field_path, quote_value
from lathe.errors import InvalidResourceError, InvalidResourcesError, raise_errors
from lathe.graph import REFERENCE_FIELDS, upstream_key

log = logging.getLogger(__name__)

# The API group of every Lathe kind.
LATHE_GROUP = API_VERSION.partition("/")[0]

# JSON is YAML too, and kubectl apply reads .json manifests as well.
RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")
# The -f value that reads resources from standard input, as kubectl apply -f - does.
STDIN = Path("-")


# Kubernetes ObjectMeta fields (k8s.io/apimachinery, meta/v1), as `kubectl get -o yaml` writes them.
OBJECT_META_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
})


# The type each pydantic type error expects, in the words of YAML and the CRD schema.
_EXPECTED_TYPES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _yaml_type(value: Any) -> str:
    """Name the YAML type of a parsed value: a boolean, an integer, a string and so on."""
    for python_type, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                              (str, "a string"), (list, "a list"), (dict, "a mapping")):
        if isinstance(value, python_type):
            return name
    return "null" if value is None else type(value).__name__


def _found(value: Any) -> str:
    """Describe a parsed YAML document that is not a mapping: "a list of 2 items", "plain text
    ('hello')"."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "..."
        return f"plain text ({text!r})"
    return f"{_yaml_type(value)} ({value!r})"


def _type_message(error_type: str, value: Any) -> str:
    expected = _EXPECTED_TYPES[error_type]
    message = f"invalid value {quote_value(value)}: expected {expected}, got {_yaml_type(value)}"
    if isinstance(value, bool):
        return (f"{message} (YAML reads an unquoted true, false, yes, no, on or off as a "
                f"boolean); write {expected}.")
    if isinstance(value, str) and error_type == "bool_type":
        return f"{message}; write true or false without quotes."
    if isinstance(value, str) and error_type in ("int_type", "float_type"):
        try:
            float(value)
        except ValueError:
            return f"{message}; write {expected}."
        return f"{message}; remove the quotes."
    return f"{message}; write {expected}."


# Pydantic's bound and length errors: the ctx key of the limit, the rule, the fix.
_BOUND_RULES = {
    "greater_than_equal": ("ge", "at least {}", "set {} or more"),
    "greater_than": ("gt", "greater than {}", "set a value above {}"),
    "less_than_equal": ("le", "at most {}", "set {} or less"),
    "less_than": ("lt", "less than {}", "set a value below {}"),
    "multiple_of": ("multiple_of", "a multiple of {}", "round it to a multiple of {}"),
}
_LENGTH_RULES = {
    "string_too_short": ("min_length", "at least {} character{}", "lengthen it"),
    "string_too_long": ("max_length", "at most {} character{}", "shorten it"),
    "too_short": ("min_length", "at least {} item{}", "add items"),
    "too_long": ("max_length", "at most {} item{}", "remove items"),
}


def _constraint_message(error_type: str, ctx: dict[str, Any], value: Any) -> str | None:
    """Word a schema constraint that `value` breaks as what the field takes and how to fix it.

    Returns None for an error type that is not a constraint of the schema.
    """
    value_prefix = f"invalid value {quote_value(value)}: " if _scalar(value) else ""
    if error_type in ("enum", "literal_error"):
        choices = ctx.get("expected", "")
        allowed = re.findall(r"'([^']*)'", choices)
        close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6) if allowed else []
        if not close and isinstance(value, str):
            close = [choice for choice in allowed if choice.lower() == value.lower()]
        if len(allowed) == 1:
            return f"{value_prefix}must be {choices}; write {choices}."
        hint = f"did you mean {close[0]!r}?" if close else "use one of them."
        return f"{value_prefix}must be one of {choices}; {hint}"
    if error_type in _BOUND_RULES and _BOUND_RULES[error_type][0] in ctx:
        key, rule, fix = _BOUND_RULES[error_type]
        limit = ctx[key]
        return f"{value_prefix}must be {rule.format(limit)}; {fix.format(limit)}."
    if error_type in _LENGTH_RULES and _LENGTH_RULES[error_type][0] in ctx:
        key, rule, fix = _LENGTH_RULES[error_type]
        limit = int(ctx[key])
        if error_type == "string_too_short" and limit == 1:
            return f"{value_prefix}must not be empty; set a value."
        if error_type == "too_short" and limit == 1:
            return f"{value_prefix}must not be empty; add at least one item."
        return f"{value_prefix}must have {rule.format(limit, '' if limit == 1 else 's')}; {fix}."
    if error_type == "string_pattern_mismatch" and "pattern" in ctx:
        return (f"{value_prefix}must match the pattern {quote_value(ctx['pattern'])}; change it "
                "to match.")
    return None


def _describe(error: dict[str, Any], model: type[BaseModel] | None = None) -> tuple[str, str]:
    location = tuple(part for part in error["loc"] if part not in KINDS)
    # Tagged unions and Literal kinds prefix the location with the model name; drop it.
    field = field_path(location)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        name = str(location[-1]) if location else field
        known = _field_names(model, location[:-1]) if model else []
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif known and len(known) <= 12:
            # A short list of the fields here is the fix when no name is close.
            hint = f"remove it or fix its spelling; the fields here are {', '.join(known)}."
        else:
            hint = "remove it or fix its spelling."
        return field, f"unknown field {name!r}; {hint}"
    if error["type"] == "missing":
        return field, "required field is missing; add it."
    if error["type"] in _EXPECTED_TYPES:
        return field, _type_message(error["type"], value)
    if error["type"] == RULE_ERROR:
        # A cross-field rule's message names the fields and the fix.
        message = error["ctx"]["message"]
        # A missing field has no value to quote (None).
        if error["ctx"]["names_field"] and _scalar(value) and value is not None:
            return field, f"invalid value {quote_value(value)}: {message}."
        return field, f"{message}."
    constraint = _constraint_message(error["type"], error.get("ctx") or {}, value)
    if constraint:
        return field, constraint
    # A validator's own message is the fix; pydantic prefixes it with "Value error, ".
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    if not _scalar(value):
        # A list or an object would print whole; the message names what is wrong in it.
        return field, f"{message}."
    if "; " in message:
        return field, f"invalid value {quote_value(value)}: {message}."
    return field, f"invalid value {quote_value(value)}: {message}; correct the value."


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """Return (field, value) of the first inf or NaN in a YAML value (`.inf`, `.nan`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}")
        if found:
            return found
    return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _field_names(model: type[BaseModel], location: tuple) -> list[str]:
    """Return the wire names of the fields of the object at `location` inside `model`."""
    current: Any = model
    for part in location:
        if isinstance(part, int):
            continue
        fields = {(info.alias or name): info for name, info in current.model_fields.items()}
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    return [info.alias or name for name, info in current.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the model class inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _did_you_mean(value: str, known) -> str:
    """Return " did you mean 'x'?" for the closest of `known`, or ""."""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return f" did you mean {close[0]!r}?" if close else ""


def other_api_group(document: Any) -> bool:
    """Return True for the manifest of another API group, such as a ConfigMap or a
    PersistentVolumeClaim, which lathe skips and `kubectl apply` creates.

    A document of a Lathe kind whose group is empty or close to lathe.dev is a Lathe resource
    with a misspelled apiVersion, so it returns False for parse_resource to reject.
    """
    if not isinstance(document, dict):
        return False
    api_version = document.get("apiVersion")
    kind = document.get("kind")
    lathe_kind = isinstance(kind, str) and kind in KINDS
    if not isinstance(api_version, str) or not api_version:
        # A patch or values file without apiVersion, such as Argo CD's argocd-cm patch, is not
        # a Lathe resource unless its kind is one.
        return not lathe_kind and (kind is None or isinstance(kind, str))
    group = api_version.rpartition("/")[0]
    if group == LATHE_GROUP:
        return False
    if lathe_kind:
        return bool(group) and not difflib.get_close_matches(group, [LATHE_GROUP], cutoff=0.6)
    return True


def parse_resource(document: dict[str, Any], origin: str) -> Resource:
    if not isinstance(document, dict):
        raise InvalidResourceError(
            origin, "",
            f"found {_found(document)}, but a resource is a mapping with apiVersion, kind, "
            "metadata and spec; write it as `key: value` lines, or remove the document.",
        )
    kind = document.get("kind")
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}  # pydantic reports the missing or wrongly typed metadata below
    name = metadata.get("name") or "<unnamed>"
    namespace = metadata.get("namespace") or "default"
    # The form of Resource.label, so that every error names a resource the same way.
    label = (f"{kind if isinstance(kind, str) and kind else '<no kind>'}/{namespace}/{name} "
             f"(in {origin})")
    api_version = document.get("apiVersion")
    if other_api_group(document):
        raise InvalidResourceError(
            label, "apiVersion",
            f"{api_version!r} is not a Lathe API version, so this is not a Lathe resource; "
            f"lathe reads only {API_VERSION} resources. Apply it with kubectl apply instead.",
        )
    if api_version != API_VERSION:
        raise InvalidResourceError(
            label, "apiVersion",
            f"invalid value {document.get('apiVersion')!r}; set it to {API_VERSION!r}.",
        )
    # NB: a list or mapping is unhashable, so test the type before the dict lookup.
    if not isinstance(kind, str):
        raise InvalidResourceError(
            label, "kind", f"invalid value {kind!r}: kind must be a string; use one of "
            f"{', '.join(KINDS)}."
        )
    if kind not in KINDS:
        raise InvalidResourceError(
            label, "kind", f"unknown kind {kind!r};{_did_you_mean(kind, KINDS)} use one of "
            f"{', '.join(KINDS)}."
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
    infinite = _non_finite(document.get("spec"), "spec")
    if infinite:
        # JSON has no inf or NaN, so the API server and the stage config could not carry it.
        field, value = infinite
        raise InvalidResourceError(label, field, f"invalid value {value!r}: write a finite "
                                   "number.")
    try:
        return KINDS[kind].model_validate(document)
    except ValidationError as error:
        # Every problem at once, each on its own line, so a user does not fix them one run at
        # a time.
        problems = [InvalidResourceError(label, field, message)
                    for field, message in list_errors(error, kind)]
        raise (problems[0] if len(problems) == 1 else InvalidResourcesError(problems)) from None


def list_errors(error: ValidationError, kind: str) -> list[tuple[str, str]]:
    """Return each problem of a resource's ValidationError as (field, message with the value
    and the fix)."""
    items = error.errors()
    if error.title == ObjectMeta.__name__:
        # Raised by ObjectMeta on its own, as the operator builds it from the object's metadata,
        # so the locations start inside metadata.
        items = [{**item, "loc": ("metadata", *item["loc"])} for item in items]
    return [_describe(item, KINDS[kind]) for item in items]


def describe_errors(error: ValidationError, kind: str) -> tuple[str, str]:
    """Return the field of the first problem of a resource's ValidationError, and one line
    that lists every problem, for a status condition's message."""
    problems = list_errors(error, kind)
    field, message = problems[0]
    if len(problems) > 1:
        message += " Also: " + " ".join(f"{other}: {text}" for other, text in problems[1:])
    return field, message


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key repeated in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated in one mapping.

    PyYAML keeps the last value of a repeated key, so `name: x` then `name: y` would silently
    drop x. Keys merged in with `<<` may still be overridden, as YAML specifies.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # SafeLoader rejects an unhashable key itself
            if first is not None:
                raise _DuplicateKeyError(
                    None, None, f"duplicate key {key!r}, first at line {first.line + 1}",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, which reads a number with an exponent but no dot (3e-3) as a string.
# Kubernetes' YAML parser, like YAML 1.2, reads it as a number, and so does this loader, so
# that `lathe run` accepts what `kubectl apply` accepts.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml_message(error: yaml.YAMLError) -> str:
    """Render a YAML error on one line, with the file, line and column of the problem."""
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character if isinstance(error.character, str) else chr(error.character)
        return (f"invalid YAML: character U+{ord(character):04X} at offset "
                f"{error.position} is not allowed in YAML ({error.reason}); remove it.")
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"invalid YAML: {error}; correct the syntax."
    mark = error.problem_mark
    # The error's label names the file already.
    message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
    message += error.problem or "syntax error"
    if error.context and error.context_mark is not None:
        start = error.context_mark
        message += f" ({error.context} at line {start.line + 1}, column {start.column + 1})"
    if "unknown escape character" in message:
        return message + ("; a backslash in a double-quoted string starts an escape, so write "
                          "regular expressions in single quotes.")
    if isinstance(error, _DuplicateKeyError):
        if mark.column == 0 and error.problem.startswith(("duplicate key 'apiVersion'",
                                                          "duplicate key 'kind'")):
            # Files joined with cat, without a document separator between them.
            return message + ("; if a second resource starts there, put a line with only --- "
                              "before it.")
        return message + "; remove one of the two."
    return message + "; correct the syntax there."


@dataclasses.dataclass
class _Document:
    """One parsed YAML document, or one item of a `kind: List` document, and where it starts."""

    data: Any
    # Such as "document 2 (line 9)", counting documents and lines from 1.
    position: str


def _read_documents(path: Path) -> list[_Document]:
    """Parse every YAML document of a UTF-8 file, or of standard input for `-`. Errors name
    the file, line and column."""
    name = _origin_name(path)
    try:
        text = sys.stdin.read() if path == STDIN else path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidResourceError(
            name, "",
            f"not valid UTF-8 text: byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}; save the file as UTF-8.",
        ) from None
    except OSError as error:
        raise InvalidResourceError(
            name, "", f"cannot be read: {error.strerror}; check the path and its "
            "permissions.",
        ) from None
    try:
        yaml_loader = _UniqueKeyLoader(text)
    except yaml.YAMLError as error:  # a character that YAML does not allow
        raise InvalidResourceError(name, "", _yaml_message(error)) from None
    # The reader names a str stream "<unicode string>" in its error marks.
    yaml_loader.name = name
    try:
        documents = []
        # The two steps of get_data(), keeping the node, whose mark gives the first line.
        while yaml_loader.check_node():
            node = yaml_loader.get_node()
            documents += _unpack_list(yaml_loader.construct_document(node), node,
                                      len(documents) + 1)
        return documents
    except yaml.YAMLError as error:
        raise InvalidResourceError(name, "", _yaml_message(error)) from None
    finally:
        yaml_loader.dispose()


def _origin_name(path: Path) -> str:
    return "standard input" if path == STDIN else str(path)


@dataclasses.dataclass
class _FileContents:
    """The contents of one file: its Lathe resources, the number of other API groups'
    manifests skipped, and the errors of its invalid documents."""

    resources: list[Resource] = dataclasses.field(default_factory=list)
    skipped: int = 0
    errors: list[InvalidResourceError] = dataclasses.field(default_factory=list)
    empty: bool = False


def _read_resources(path: Path) -> _FileContents:
    """Parse every document of a file, collecting the error of each invalid one."""
    origin = _origin_name(path)
    contents = _FileContents()
    try:
        documents = _read_documents(path)
    except InvalidResourceError as error:
        contents.errors.append(error)
        return contents
    if not any(document.data is not None for document in documents):
        # A file emptied by mistake would otherwise drop its stages without a word.
        log.warning("skipped %s: it contains no YAML documents (it is empty or only comments); add "
                    "its resources or leave it out.", origin)
        contents.empty = True
        return contents
    for document in documents:
        if not document.data:
            continue
        if other_api_group(document.data):
            _warn_skipped(document.data, path)
            contents.skipped += 1
            continue
        # A mapping's errors name its resource, and any other document its position.
        where = origin if isinstance(document.data, dict) else f"{origin}, {document.position}"
        try:
            resource = parse_resource(document.data, where)
        except InvalidResourceError as error:
            contents.errors.append(error)
            continue
        resource._origin = origin
        resource._position = document.position
        contents.resources.append(resource)
    return contents


def _unpack_list(data: Any, node: yaml.Node, number: int) -> list[_Document]:
    """Return document `number`, or the items of a `kind: List` document, as
    `kubectl get -o yaml` writes several objects."""
    position = f"document {number} (line {node.start_mark.line + 1})"
    if not (isinstance(data, dict) and data.get("apiVersion") == "v1"
            and data.get("kind") == "List" and isinstance(data.get("items"), list)):
        return [_Document(data, position)]
    item_nodes = next((value.value for key, value in node.value
                       if key.value == "items" and isinstance(value, yaml.SequenceNode)), [])
    if len(item_nodes) != len(data["items"]):
        # Items that a merge key (<<) brought in have no node here: use the document's line.
        item_nodes = [node] * len(data["items"])
    return [
        _Document(item, f"document {number}, item {index + 1} "
                        f"(line {item_node.start_mark.line + 1})")
        for index, (item, item_node) in enumerate(zip(data["items"], item_nodes, strict=True))
    ]


def _warn_skipped(document: dict[str, Any], path: Path) -> None:
    kind = document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    manifest = kind if isinstance(kind, str) and kind else "<no kind>"
    manifest += f" {name!r}" if isinstance(name, str) and name else " <unnamed>"
    if path == STDIN:
        action = "create it with kubectl apply"
    elif kind == "Kustomization":
        action = f"kustomize reads it with `kubectl apply -k {shlex.quote(str(path.parent))}`"
    else:
        action = f"create it with `kubectl apply -f {shlex.quote(str(path))}`"
    if not document.get("apiVersion"):
        log.warning(
            "skipped %s in %s: it has no apiVersion, so it is not a Lathe resource (a patch or "
            "values file); lathe reads only %s resources.", manifest, _origin_name(path),
            API_VERSION,
        )
        return
    log.warning(
        "skipped %s in %s: apiVersion %r is not a Lathe API version, and lathe reads only %s "
        "resources; %s.",
        manifest, _origin_name(path), document["apiVersion"], API_VERSION, action,
    )


def load_file(path: Path) -> list[Resource]:
    """Load the Lathe resources of one file, and warn about each manifest of another API group
    that it skips.

    Raises InvalidResourceError, or InvalidResourcesError naming every invalid document.
    """
    contents = _read_resources(path)
    raise_errors(contents.errors)
    return contents.resources


def _resource_files(paths: list[Path]) -> tuple[list[Path], list[InvalidResourceError]]:
    """List each file named, and each resource file directly inside a named folder, once.
    Returns the files and an error for each path that does not exist."""
    files: dict[Path, Path] = {}
    errors = []
    for path in paths:
        if path == STDIN:
            files.setdefault(STDIN, STDIN)
            continue
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in RESOURCE_SUFFIXES)
        elif path.exists():
            # A regular file, or a pipe such as /dev/stdin or a shell's <(...).
            found = [path]
        else:
            errors.append(InvalidResourceError(str(path), "-f", "file or folder does not exist; "
                                               "pass an existing path."))
            continue
        # A file named twice, on its own and in its folder, is read once.
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values()), errors


def load_paths(paths: list[Path]) -> list[Resource]:
    """Load every resource file named, or found directly inside a named folder.

    Manifests of other API groups are skipped with a warning each. The errors of every missing
    path, file and document are raised together, as InvalidResourcesError when there are
    several. Only when all of them parse are names and references across files checked.
    """
    files, errors = _resource_files(paths)
    resources: list[Resource] = []
    skipped = 0
    empty = 0
    for file in files:
        contents = _read_resources(file)
        resources += contents.resources
        skipped += contents.skipped
        empty += contents.empty
        errors += contents.errors
    raise_errors(errors)
    if not resources:
        names = ", ".join(_origin_name(path) for path in paths)
        message = "no resources found; pass .yaml files or a folder that contains them."
        if files and empty == len(files):
            message = ("no resources found, because every file is empty or only comments; add "
                       f"{API_VERSION} resources to them.")
        if skipped:
            skipped_text = (f"{skipped} non-Lathe resources were skipped" if skipped > 1
                            else "1 non-Lathe resource was skipped")
            message = (f"no resources found, and {skipped_text} (see the warnings above); pass "
                       f"files or a folder that contain {API_VERSION} resources.")
        raise InvalidResourceError(names, "-f", message)
    raise_errors(_duplicate_errors(resources) + _reference_namespace_errors(resources))
    return resources


def _duplicate_errors(resources: list[Resource]) -> list[InvalidResourceError]:
    errors = []
    seen: dict[str, Resource] = {}
    for resource in resources:
        if resource.key in seen:
            errors.append(InvalidResourceError(
                resource.label, "metadata.name",
                f"defined twice, by {_where(resource)} and by "
                f"{_where(seen[resource.key])}; give each resource its own name, or remove "
                "one of the two documents.",
            ))
            continue
        seen[resource.key] = resource
    return errors


def _where(resource: Resource) -> str:
    """Return where `resource` was read: "document 2 (line 9) of a.yaml"."""
    if not resource._position:
        return resource.label
    return f"{resource._position} of {resource._origin}"


def _reference_namespace_errors(resources: list[Resource]) -> list[InvalidResourceError]:
    """Return an error for each reference whose target is defined only in another namespace.

    lathe.graph.order reports a reference to a resource that is not defined at all; this check
    runs first, so that a namespace mismatch is not reported as a missing resource.
    """
    errors = []
    keys = {resource.key for resource in resources}
    for resource in resources:
        for role, (kind, name) in resource.references().items():
            if upstream_key(resource, kind, name) in keys:
                continue
            elsewhere = [other for other in resources
                         if other.kind == kind and other.metadata.name == name]
            if elsewhere:
                found = ", ".join(other.label for other in elsewhere)
                errors.append(InvalidResourceError(
                    resource.label, REFERENCE_FIELDS.get(role, role),
                    f"references {kind} {name!r} in namespace "
                    f"{resource.metadata.namespace!r}, but it is defined only as {found}; "
                    "references resolve only within the resource's own namespace, so set the "
                    "same metadata.namespace on both.",
                ))
    return errors
