"""Generate the CustomResourceDefinitions in crds/ from the pydantic API models.

The API models are the single source of truth: `python -m lathe.crdgen` rewrites crds/ and the
Helm chart's copies in charts/lathe/templates/crds/, and a unit test fails when the committed YAML
differs from what this module writes. The chart's copies are templates wrapped in
`{{- if .Values.crds.install }}`, so a team that manages the CRDs itself can turn them off.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 schema. The
conversion inlines every `$ref`, turns `anyOf [X, null]` into X with `nullable: true`, and maps
exclusive bounds to the v3.0 boolean form. Defaults are kept, so the API server fills them in
before it evaluates the CEL rules and `kubectl get -o yaml` shows the values in force. A nested
object whose fields all have defaults gets `default: {}`, so that its own defaults apply when the
user leaves the whole object out. Defaulted fields do not count as drift for `kubectl diff` or
Argo CD, which compare only the fields the manifest sets.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from lathe.api import GROUP, KINDS, VERSION, Resource
from lathe.api.common import METADATA_NAME_SCHEMA

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
CHART_DIR = REPO / "charts" / "lathe"
CHART_CRD_DIR = CHART_DIR / "templates" / "crds"

# Keywords of JSON Schema that a structural OpenAPI v3.0 schema accepts as they are.
_KEPT = {
    "type", "description", "enum", "format", "pattern", "minimum", "maximum", "minLength",
    "maxLength", "minItems", "maxItems", "required", "nullable", "x-kubernetes-validations",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "default",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        # A description on the referencing field wins over the referenced class docstring.
        if "description" in node:
            target["description"] = node["description"]
        return target
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node into a structural OpenAPI v3.0 node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            raise ValueError(f"Cannot express a union of {len(options)} types structurally.")
        merged = {**to_structural(options[0], defs)}
        # Keywords on the optional field itself, such as a description or a pattern that
        # json_schema_extra adds, apply to the value.
        for key, value in node.items():
            if key in _KEPT and key not in ("type", "nullable"):
                merged[key] = value
        if nullable:
            merged["nullable"] = True
        return merged
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
        node.setdefault("type", "string")

    out = {key: value for key, value in node.items() if key in _KEPT}
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True

    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        properties = node.get("properties")
        if properties:
            required = set(node.get("required", ()))
            out["properties"] = {
                name: _with_object_default(to_structural(child, defs), name in required)
                for name, child in properties.items()
            }
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = to_structural(extra, defs)
        elif extra is True or (not properties and extra is None) or extra == {}:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = to_structural(node.get("items", {}), defs)
    elif kind is None and not node.get("x-kubernetes-int-or-string"):
        # Any JSON value (a field typed Any): keep it without a schema.
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _with_object_default(node: dict[str, Any], required: bool) -> dict[str, Any]:
    """Give an optional object field without a default the default {} (see module docstring)."""
    if node.get("default", 0) is None:
        del node["default"]  # `default: null` is not valid in a structural schema
    defaultable = (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("required")
        and not node.get("nullable")
    )
    if defaultable and not required and "default" not in node:
        node["default"] = {}
    return node


def openapi_schema(model: type[Resource]) -> dict[str, Any]:
    spec_type = model.model_fields["spec"].annotation
    status_type = model.model_fields["status"].annotation.__args__[0]
    spec_json = spec_type.model_json_schema(by_alias=True, mode="validation")
    status_json = status_type.model_json_schema(by_alias=True, mode="validation")
    spec = to_structural(spec_json, spec_json.get("$defs", {}))
    status = to_structural(status_json, status_json.get("$defs", {}))
    # NB: status keeps unknown fields so that a newer operator's status does not get pruned
    # while an older CRD is still installed.
    status["x-kubernetes-preserve-unknown-fields"] = True
    schema = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            # NB: a CRD may constrain only metadata.name and metadata.generateName.
            "metadata": {"type": "object", "properties": {"name": METADATA_NAME_SCHEMA}},
            "spec": spec,
            "status": status,
        },
    }
    return schema


def crd(model: type[Resource]) -> dict[str, Any]:
    columns = [
        {
            key: value
            for key, value in {
                "name": column.name,
                "type": column.type,
                "jsonPath": column.json_path,
                "description": column.description or None,
                "priority": column.priority or None,
            }.items()
            if value is not None
        }
        for column in model.printer_columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{model.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": model.kind_name,
                "listKind": f"{model.kind_name}List",
                "plural": model.plural,
                "singular": model.kind_name.lower(),
                "shortNames": list(model.short_names),
                "categories": ["lathe"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": openapi_schema(model)},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m lathe.crdgen` from operator/lathe/api. Do not edit.\n"


def render_all() -> dict[str, str]:
    """Return {file name: YAML text} for every CRD."""
    return {
        f"{GROUP}_{model.plural}.yaml": HEADER + yaml.safe_dump(crd(model), sort_keys=False)
        for model in KINDS.values()
    }


def escape_template(text: str) -> str:
    """Escape Go template actions, so that Helm renders `text` unchanged.

    Only `{{` starts an action; a lone `}}` is plain text to Go's text/template.
    """
    return text.replace("{{", '{{ "{{" }}')


def chart_crd(model: type[Resource]) -> str:
    """Return the Helm chart's template of one CRD: rendered only when crds.install is true.

    The CRD is kept on `helm uninstall` unless crds.keep is false, because deleting it deletes
    every resource of its kind. Argo CD ignores Helm's keep policy when it prunes a resource
    that left the rendered chart, so the CRD also carries Argo CD's sync options against pruning
    and deleting it.
    """
    body = yaml.safe_dump(crd(model), sort_keys=False)
    marker = "\nmetadata:\n"  # the top-level key: nested keys are indented
    keep = (
        "  {{- if .Values.crds.keep }}\n"
        "  annotations:\n"
        "    helm.sh/resource-policy: keep\n"
        "    argocd.argoproj.io/sync-options: Prune=false,Delete=false\n"
        "  {{- end }}\n"
    )
    labels = '  labels:\n    {{- include "lathe.labels" . | nindent 4 }}\n'
    before, _, after = escape_template(body).partition(marker)
    return (
        "{{- if .Values.crds.install }}\n" + HEADER + before + marker + keep + labels + after
        + "{{- end }}\n"
    )


def render_chart_all() -> dict[str, str]:
    """Return {file name: template text} for the Helm chart's copy of every CRD."""
    return {f"{GROUP}_{model.plural}.yaml": chart_crd(model) for model in KINDS.values()}


def outputs() -> dict[Path, dict[str, str]]:
    """Return {directory: {file name: text}}: crds/, and the chart's copies when the chart exists."""
    result = {CRD_DIR: render_all()}
    if (CHART_DIR / "Chart.yaml").is_file():
        result[CHART_CRD_DIR] = render_chart_all()
    return result


def write() -> list[Path]:
    written = []
    for directory, files in outputs().items():
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = directory / name
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="Fail if crds/ or the chart's CRDs are out of date."
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            str(directory / name)
            for directory, files in outputs().items()
            for name, text in files.items()
            if not (directory / name).is_file() or (directory / name).read_text() != text
        ]
        if stale:
            print("Out of date; run `python -m lathe.crdgen`: " + ", ".join(stale))
            return 1
        return 0
    for path in write():
        print(f"Wrote {path.relative_to(REPO)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
