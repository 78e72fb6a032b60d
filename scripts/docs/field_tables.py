"""Print the spec field tables of docs/resources.md from the pydantic API models.

The API models in operator/lathe/api are the source of the CRDs and of these tables. Run

    .venv/bin/python scripts/docs/field_tables.py

and paste each kind's table into docs/resources.md after an API change. Nested objects are
flattened into dotted paths (`dedup.near.threshold`), and list items are written `sources[].name`.
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "operator"))

from lathe import crdgen  # noqa: E402  (needs the path above)
from lathe.api import KINDS  # noqa: E402


def _without_none(annotation: Any) -> Any:
    """Return the annotation of an optional field without its `None` member."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """Return the model class of a nested object or of a list's items, else None."""
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is list:
        annotation = _without_none(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_name(annotation: Any) -> str:
    """Return a short wire type name: string, integer, enum values, list of X, map."""
    annotation = _without_none(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return f"map of {type_name(typing.get_args(annotation)[1])}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, "any")


def _int_or_string(field: Any) -> bool:
    """Return whether the field's schema is Kubernetes' int-or-string, as for quantities."""
    return any((getattr(item, "json_schema", None) or {}).get("x-kubernetes-int-or-string")
               for item in field.metadata)


def bounds_text(field: Any) -> str:
    """Return the field's numeric and length constraints, such as `>= 1, <= 1024`."""
    parts = []
    for constraint in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        for attribute, label in (("min_length", "min length"), ("max_length", "max length")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                parts.append(f"{label} {value}")
    return ", ".join(parts)


def default_text(field: Any) -> str:
    """Return the default as it appears on the wire, `required`, or `-` for unset."""
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None or value is PydanticUndefined:
        return "-"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        value = [item.value if isinstance(item, enum.Enum) else item for item in value]
    # NB: a `|` ends a table cell even inside a code span, so it is escaped.
    return f"`{json.dumps(value, ensure_ascii=False)}`".replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Return (path, type, default, description) for every field of model, nested ones too."""
    result = []
    for name, field in model.model_fields.items():
        path = prefix + to_camel(name)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        bounds = bounds_text(field)
        kind = ("integer or string" if _int_or_string(field) else type_name(field.annotation))
        kind += f" ({bounds})" if bounds else ""
        result.append((f"`{path}`", kind, default_text(field), description))
        nested = _model_of(field.annotation)
        if nested is not None:
            is_list = typing.get_origin(_without_none(field.annotation)) is list
            result.extend(rows(nested, path + ("[]." if is_list else ".")))
    return result


def table(kind: str) -> str:
    """Return the markdown field table of one kind's spec."""
    spec = KINDS[kind].model_fields["spec"].annotation
    lines = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in rows(spec)]
    return "\n".join(lines)


def _rules(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Return (path, rule) for the CEL rules of a CRD schema node and of every node in it."""
    found = [(path, rule) for rule in node.get("x-kubernetes-validations", ())]
    for name, child in (node.get("properties") or {}).items():
        found += _rules(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        found += _rules(node["items"], f"{path}[]")
    return found


def cel_table() -> str:
    """Return the markdown table of every CEL rule in the CRDs, with the kinds and the fields
    that carry it."""
    by_rule: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for kind, model in KINDS.items():
        schema = crdgen.crd(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, rule in _rules(schema, ""):
            kinds, paths = by_rule.setdefault((rule["rule"], rule["message"]), ([], []))
            if kind not in kinds:
                kinds.append(kind)
            if path not in paths:
                paths.append(path)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| kind | on | rule | message |", "| --- | --- | --- | --- |"]
    for (rule, message), (kinds, paths) in by_rule.items():
        on = ", ".join(f"`{path}`" for path in paths)
        lines.append(f"| {', '.join(kinds)} | {on} | `{cell(rule)}` | {cell(message)} |")
    return "\n".join(lines)


def main() -> None:
    for kind in KINDS:
        print(f"### {kind} spec fields\n\n{table(kind)}\n")
    print(f"### CEL rules (docs/crds.md)\n\n{cel_table()}\n")


if __name__ == "__main__":
    main()
