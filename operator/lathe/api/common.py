"""Types shared by the five Lathe resources: metadata, references, conditions and status.

The API models are the single source of truth. The CRD YAML in crds/ and in the Helm chart is
generated from them (lathe.crdgen), and every field's description becomes `kubectl explain` text.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

GROUP = "lathe.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


@dataclass(frozen=True)
class CelRule:
    """A cross-field rule, checked by the API server (CEL) and, identically, by pydantic.

    `rule` is the CEL expression over `self` (the object in its camelCase wire form) that goes
    into the CRD's `x-kubernetes-validations`; `check` is the same rule in Python over the model,
    so `lathe run` rejects what the API server would reject. The message names the field and
    the fix. `field` is the wire path, relative to the object, of the field an error names (its
    `fieldPath` in the CRD), such as `sequenceLength`. Without it, the error names the object.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field: str | None = None


def _add_cel_rules(schema: dict[str, Any], model: type) -> None:
    rules = model.__dict__.get("cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [
            {"rule": rule.rule, "message": rule.message}
            | ({"fieldPath": f".{rule.field}"} if rule.field else {})
            for rule in rules
        ]


# The pydantic error type of a broken cross-field rule, which lathe.loader formats.
RULE_ERROR = "lathe_rule"

Location = tuple[str | int, ...]


def rule_error(model: type[BaseModel], problems: list[tuple[Location, Any, str]]) -> ValidationError:
    """Build the error for broken cross-field rules, one per (location, value, message).

    A location is a wire path relative to the model, such as ("stages", 0, "untilStep"), and
    pydantic prefixes the model's own location. An empty location names the model itself, and
    its value is then left out of the message, because it would print the whole object.
    """
    return ValidationError.from_exception_data(
        model.__name__,
        [
            InitErrorDetails(
                type=PydanticCustomError(
                    RULE_ERROR, "{message}", {"message": message, "names_field": bool(location)}
                ),
                loc=location,
                input=value,
            )
            for location, value, message in problems
        ],
    )


def field_path(location: tuple[Any, ...]) -> str:
    """Render a pydantic error location as `spec.sources[0].path`."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def quote_value(value: Any) -> str:
    """Quote a value for a message as a YAML file writes it.

    A printable string with backslashes, such as a regular expression, keeps single
    backslashes, as in YAML single quotes, where repr() would double them. Every other value,
    including a string with a control character or a single quote, is shown by repr().
    """
    if isinstance(value, str) and "\\" in value and "'" not in value and value.isprintable():
        return f"'{value}'"
    return repr(value)


def _is_integer_field(annotation: Any) -> bool:
    """Return True for an `int` or `int | None` annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arguments = [item for item in typing.get_args(annotation) if item is not type(None)]
        return arguments == [int]
    return annotation is int


class ApiModel(BaseModel):
    """Base of every spec and status type: camelCase on the wire, unknown fields rejected.

    Types are strict, as the CRD's are: a quoted number, a number for a boolean or `yes` for a
    number is rejected, not converted. An integer is still a valid float, as in a `number`.
    Enum fields set `strict=False`, because strict mode accepts only enum members from Python
    objects, not their string values.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        use_enum_values=True,
        json_schema_extra=_add_cel_rules,
    )

    # Cross-field rules of this type; the CRD generator copies them into the schema.
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _whole_number_to_int(cls, value: Any, info: ValidationInfo) -> Any:
        # The API server accepts 2.0 for an `integer` field (kubectl sends it as 2), which
        # strict mode would reject.
        if isinstance(value, float) and value.is_integer() and info.field_name is not None:
            if _is_integer_field(cls.model_fields[info.field_name].annotation):
                return int(value)
        return value

    @model_validator(mode="after")
    def _check_cel_rules(self) -> ApiModel:
        problems = []
        for rule in type(self).cel_rules:
            if not rule.check(self):
                location = tuple(rule.field.split(".")) if rule.field else ()
                problems.append((location, self.value_at(location), rule.message))
        if problems:
            raise rule_error(type(self), problems)
        return self

    def value_at(self, location: Location) -> Any:
        """Return the value at a wire path relative to this object, such as ("stages", 0)."""
        value: Any = self
        for part in location:
            if isinstance(part, int):
                value = value[part]
                continue
            fields = type(value).model_fields
            name = next(name for name, info in fields.items() if (info.alias or name) == part)
            value = getattr(value, name)
        return value


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_LABEL_RULE = (
    "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 "
    "characters"
)


def _check_dns_label(value: str, fix: str = "rename it, for example to {suggestion}") -> str:
    """Raise ValueError unless `value` is a DNS-1123 label (RFC 1123), as Kubernetes defines it.

    `fix` is the message's last clause, and `{suggestion}` in it becomes a valid label made
    from `value`.
    """
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower())[:63].strip("-")
        if not suggestion:
            # Nothing of the value survives, so the message gives no example name.
            fix = fix.split(", for example")[0]
        raise ValueError(f"must be a DNS-1123 label: {DNS_LABEL_RULE}; "
                         + fix.format(suggestion=repr(suggestion)))
    return value


# The schema of metadata.name in the CRDs. The API server itself accepts any DNS-1123 subdomain
# (lowercase letters, digits, '-' and '.', at most 253 characters) as the name of a custom
# resource. The length limit and this rule narrow it to a DNS-1123 label, as ObjectMeta does.
METADATA_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "maxLength": 63,
    "x-kubernetes-validations": [
        {
            "rule": "!self.contains('.')",
            "message": "must not contain '.', because Lathe names Jobs, Services and pod "
            "labels after the resource, and those names are DNS-1123 labels; rename it with "
            "'-' in place of each '.'",
            "messageExpression": '"must not contain \'.\', because Lathe names Jobs, '
            "Services and pod labels after the resource, and those names are DNS-1123 labels; "
            'rename it, for example to \'" + self.replace(".", "-") + "\'"',
        }
    ],
}


class ObjectMeta(BaseModel):
    """The subset of Kubernetes object metadata that Lathe reads."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    # NB: Lathe names Jobs, Services and label values after the resource, so the name is a
    # DNS-1123 label even though the API server accepts any DNS subdomain for a custom resource.
    name: str = Field(description="Name of the resource, unique per kind in its namespace.")
    # NB: `lathe run` writes under <workspace>/<namespace>, so a namespace such as `../x` would
    # leave the workspace; the API server accepts only DNS-1123 labels too.
    namespace: str = Field(default="default", description="Namespace of the resource.")
    uid: str | None = Field(default=None, description="Unique id assigned by the API server.")
    generation: int = Field(default=1, description="Spec generation assigned by the API server.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")

    @field_validator("name", "namespace")
    @classmethod
    def _check_names(cls, value: str) -> str:
        return _check_dns_label(value)


_REFERENCE_NAME_FIX = (
    "set it to the metadata.name of the referenced resource, for example {suggestion}"
)


class LocalObjectReference(ApiModel):
    """A reference to another Lathe resource in the same namespace."""

    name: str = Field(
        max_length=63,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.matches('^{_DNS_LABEL.pattern}$')",
                    "message": "must be a DNS-1123 label (lowercase letters, digits and '-', "
                    "starting and ending with a letter or digit), as the name of every Lathe "
                    "resource is; set it to the metadata.name of the referenced resource",
                }
            ]
        },
        description="Name of the referenced resource in the same namespace: a DNS-1123 "
        "label, as every Lathe resource's metadata.name is.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_dns_label(value, _REFERENCE_NAME_FIX)


# Memory as a Kubernetes quantity (k8s.io/apimachinery resource.Quantity) in the forms that
# make sense for bytes: a decimal number with an optional binary suffix (Ki to Ei), decimal
# suffix (k, M, G, T, P, E) or positive exponent. It leaves out forms that Kubernetes also accepts
# but that make no sense for memory: a leading '+' or '.', the suffixes m, u and n, and negative
# exponents. The full grammar in the CEL rules would take a ModelDeployment's CRD over the
# budget of estimated rule cost of Kubernetes 1.29, which counts an int-or-string field as
# unbounded in length, whatever its maxLength.
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE]|[eE]\+?[0-9]+)?$")
# A quantity whose number is zero, whatever follows it: 0, 0.0, 0m, 0Gi, 0e3.
_ZERO = re.compile(r"^0+(\.0*)?([^0-9.].*)?$")
# CPU as cores or millicores, the forms the training pod builder divides among processes.
_CPU_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?m?$")


# The maximum length of a quantity string. From some release after 1.29 on, it also bounds the cost
# that the API server estimates for the CEL rules that match it.
QUANTITY_MAX_LENGTH = 64


def pattern_rule(pattern: str, message: str) -> dict[str, str]:
    """Return the CRD rule that a string field matches `pattern`, rejected with `message`.

    A CEL rule rather than the schema's `pattern` keyword, because the API server rejects a
    `pattern` mismatch by printing the regular expression, which names no fix. The field needs
    a `maxLength`, which bounds the rule's estimated cost.
    """
    return {"rule": f"self.matches(r'{pattern}')", "message": message}


def _quantity_messages(examples: str) -> tuple[str, str]:
    """Return the messages for a string that is not a quantity and for a zero quantity."""
    return (f"not a Kubernetes quantity; write {examples}",
            "a quantity must be more than zero, because it is the pod's request and limit; "
            f"write {examples}")


def _quantity_validator(pattern: re.Pattern[str], examples: str) -> Callable[[Any], str]:
    """Return a validator that takes a quantity as an integer or a string and returns a string."""
    not_quantity, zero = _quantity_messages(examples)

    def check(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError(zero)
            return str(value)
        if isinstance(value, float):
            raise ValueError(f"a fractional quantity must be a string, because the API server "
                             f"accepts only an integer or a string here; write '{value}'")
        if isinstance(value, str) and len(value) > QUANTITY_MAX_LENGTH:
            raise ValueError(f"a quantity must be at most {QUANTITY_MAX_LENGTH} characters; "
                             f"write {examples}")
        if isinstance(value, str) and pattern.fullmatch(value):
            if _ZERO.fullmatch(value):
                raise ValueError(zero)
            return value
        raise ValueError(not_quantity)

    return check


def _quantity_type(pattern: re.Pattern[str], examples: str) -> Any:
    """Build a str type that also takes an integer, as Kubernetes' int-or-string does.

    The CRD checks it with CEL rules, whose `self` is an int or a string, with the same
    messages as the validator.
    """
    not_quantity, zero = _quantity_messages(examples)
    return Annotated[
        str,
        BeforeValidator(_quantity_validator(pattern, examples)),
        WithJsonSchema({
            "x-kubernetes-int-or-string": True,
            "maxLength": QUANTITY_MAX_LENGTH,
            "x-kubernetes-validations": [
                {"rule": f"type(self) == int || self.matches(r'{pattern.pattern}')",
                 "message": not_quantity},
                {"rule": f"type(self) == int ? self > 0 : !self.matches(r'{_ZERO.pattern}')",
                 "message": zero},
            ],
        }),
    ]


CpuQuantity = _quantity_type(
    _CPU_QUANTITY, "cores such as 2 or '1.5', or millicores such as '500m'"
)
Quantity = _quantity_type(
    _QUANTITY, "bytes with an optional suffix, such as '16Gi', '512Mi', '4G' or 1073741824"
)


class ResourceRequirements(ApiModel):
    """Compute resources for each pod (or local process group) of a stage."""

    cpu: CpuQuantity = Field(
        default="2",
        description="CPU request and limit per node, in cores (`2`, `'1.5'`) or millicores "
        "(`500m`).",
    )
    memory: Quantity = Field(
        default="8Gi",
        description="Memory request and limit per node: bytes as a Kubernetes quantity with "
        "an optional suffix (`Ki` to `Ei`, `k` to `E`) or exponent, such as `16Gi`, `4G` or "
        "`1e9`.",
    )
    gpus: int = Field(
        default=0, ge=0, le=16, description="GPUs per node, requested as `nvidia.com/gpu`."
    )
    shm_size: Quantity = Field(
        default="1Gi",
        description="Size of the memory-backed /dev/shm volume per node, in the form of "
        "`memory`, such as `1Gi`.",
    )


_PRIORITY_CLASS_FIX = (
    "must be the name of a PriorityClass, a DNS-1123 subdomain (lowercase letters, digits, "
    "'-' and '.'), such as 'high-priority'; `kubectl get priorityclasses` lists them"
)
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class Toleration(ApiModel):
    """A toleration of a node taint, as in a Kubernetes pod spec."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="a toleration with operator Exists matches every value of its key; remove "
            "value, or use operator Equal",
            check=lambda item: item.operator != "Exists" or not item.value,
            field="value",
        ),
        CelRule(
            rule="has(self.key) && self.key != '' || self.operator == 'Exists'",
            message="a toleration without key must use operator Exists (it then tolerates every "
            "taint); set key, or set operator to Exists",
            check=lambda item: bool(item.key) or item.operator == "Exists",
            field="key",
        ),
        CelRule(
            rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds applies only to effect NoExecute; remove it or set "
            "effect to NoExecute",
            check=lambda item: item.toleration_seconds is None or item.effect == "NoExecute",
            field="tolerationSeconds",
        ),
    )

    key: str | None = Field(default=None, description="Taint key to tolerate; empty with "
                            "operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = Field(
        default="Equal", description="`Equal` matches `value`; `Exists` matches any value."
    )
    value: str | None = Field(default=None, description="Taint value, for operator `Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0,
        description="For effect `NoExecute`: seconds the pod stays after the taint appears.",
    )


class Scheduling(ApiModel):
    """Placement of a workload's pods: node selector, tolerations and priority, as in a pod
    spec."""

    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels every pod requires, for example "
        "`nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3`.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Node taints the pods tolerate. Pods that request GPUs also tolerate the "
        "`nvidia.com/gpu` NoSchedule taint without this.",
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        json_schema_extra={"x-kubernetes-validations": [
            pattern_rule(f"^{_DNS_SUBDOMAIN.pattern}$", _PRIORITY_CLASS_FIX)
        ]},
        description="PriorityClass of the pods, which decides scheduling order and preemption.",
    )

    @field_validator("priority_class_name")
    @classmethod
    def _check_priority_class(cls, name: str | None) -> str | None:
        if name is not None and not _DNS_SUBDOMAIN.fullmatch(name):
            raise ValueError(_PRIORITY_CLASS_FIX)
        return name

    @field_validator("node_selector")
    @classmethod
    def _check_labels(cls, selector: dict[str, str]) -> dict[str, str]:
        # NB: checked here rather than in CEL, whose cost estimate for a regex over every key
        # of an unbounded map exceeds the API server's budget.
        for key, value in selector.items():
            _check_label(key, value, "node selector")
        return selector

    def pod_spec(self) -> dict[str, Any]:
        """Return the pod spec fields for these settings, in the API server's field names."""
        fields: dict[str, Any] = {}
        if self.node_selector:
            fields["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            fields["tolerations"] = [
                item.model_dump(mode="json", by_alias=True, exclude_none=True)
                for item in self.tolerations
            ]
        if self.priority_class_name:
            fields["priorityClassName"] = self.priority_class_name
        return fields


def _check_label_key(key: str, what: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (len(name) > 63 or not _LABEL_NAME.fullmatch(name)
            or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)))):
        raise ValueError(
            f"{what} key {key!r} is not a Kubernetes label key; use an optional DNS prefix and "
            "'/', then up to 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit"
        )


def _check_label(key: str, value: str, what: str) -> None:
    _check_label_key(key, what)
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        raise ValueError(
            f"{what} value {value!r} of {key!r} is not a Kubernetes label value; use up to 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )


# Pod labels and annotations that Lathe or the Job and Deployment controllers set and select
# pods by. A pod that carries another value is not found by its Job, or by Lathe.
_RESERVED_POD_KEYS = ("app.kubernetes.io/name", "app.kubernetes.io/managed-by",
                      "app.kubernetes.io/component", "controller-uid", "job-name",
                      "pod-template-hash")
_RESERVED_POD_PREFIXES = ("lathe.dev/", "batch.kubernetes.io/")


def _check_not_reserved(key: str, what: str) -> None:
    if key in _RESERVED_POD_KEYS or key.startswith(_RESERVED_POD_PREFIXES):
        raise ValueError(
            f"{what} key {key!r} is set by Lathe or the Job controller, which find the pods by "
            "it; use a key of your own"
        )


class PodMetadata(ApiModel):
    """Labels and annotations added to every pod of a stage's workload."""

    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod labels. Keys that Lathe or the Job controller set (`lathe.dev/*`, "
        "`batch.kubernetes.io/*`, `app.kubernetes.io/name`, `managed-by` and `component`, "
        "`job-name`, `controller-uid`) are rejected.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod annotations, for example for a service mesh or the cluster "
        "autoscaler. The same keys as for labels are rejected.",
    )

    @field_validator("labels", "annotations", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        # `labels:` with nothing after it is null in YAML, and the API server drops a null.
        return {} if value is None else value

    @field_validator("labels")
    @classmethod
    def _check_pod_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        # NB: checked here rather than in CEL, as for Scheduling.node_selector.
        for key, value in labels.items():
            _check_label(key, value, "pod label")
            _check_not_reserved(key, "pod label")
        return labels

    @field_validator("annotations")
    @classmethod
    def _check_pod_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        for key in annotations:
            _check_label_key(key, "pod annotation")
            _check_not_reserved(key, "pod annotation")
        return annotations


# A data path: a file:///, pvc://<claim>/ or s3://<bucket>/ URI with a path after it, or a plain
# path without "://" anywhere, because the stages treat any string that contains "://" as a URI.
# NB: the API server estimates the cost of each CEL rule below from the longest string and the
# longest list (CorpusSpec.sources), and rejects a CRD whose estimate exceeds its budget. This
# length with 10000 sources fits (the cluster tests install the CRDs), because each rule scans
# the path at most once. A regular expression or a second scan would not fit.
DATA_PATH_MAX_LENGTH = 2048
_DATA_PATH_FORMS = (
    "use a path relative to the data directory or an absolute path (without '://'), "
    "file:///absolute/path, pvc://<claim>/<path> or s3://<bucket>/<key>"
)
_URI_PREFIXES = ("file://", "pvc://", "s3://")
# The form each supported scheme needs, for the error message.
_DATA_URI_FORMS = {
    "file": "file:///absolute/path",
    "pvc": "pvc://<claim>/<path>",
    "s3": "s3://<bucket>/<key>",
}


def _uri_form_message(scheme: str) -> str:
    return f"{scheme}:// data paths must have the form {_DATA_URI_FORMS[scheme]}"


# The CRD's form of _check_data_path, one rule per message. The API server shows the field and
# the value before the message. The host rules read: the first '/' after the scheme is neither
# missing, nor right after the scheme (an empty claim or bucket), nor the last character.
_DATA_PATH_RULES = [
    {
        "rule": "!self.contains('://') || "
        + " || ".join(f"self.startsWith('{prefix}')" for prefix in _URI_PREFIXES),
        "message": f"unsupported URI scheme; {_DATA_PATH_FORMS}",
    },
    {
        "rule": "!self.startsWith('file://') || self.startsWith('file:///') && size(self) > 8",
        "message": _uri_form_message("file"),
    },
    {
        "rule": "!self.startsWith('pvc://') || !(self.indexOf('/', 6) in [-1, 6, size(self) - 1])",
        "message": _uri_form_message("pvc"),
    },
    {
        "rule": "!self.startsWith('s3://') || !(self.indexOf('/', 5) in [-1, 5, size(self) - 1])",
        "message": _uri_form_message("s3"),
    },
]


def _check_data_path(path: str) -> str:
    if not path:
        raise ValueError(f"a data path must not be empty; {_DATA_PATH_FORMS}")
    if len(path) > DATA_PATH_MAX_LENGTH:
        raise ValueError(f"a data path must be at most {DATA_PATH_MAX_LENGTH} characters; "
                         "shorten it")
    if "://" not in path:
        return path
    scheme, _, rest = path.partition("://")
    if scheme.lower() in _DATA_URI_FORMS and scheme not in _DATA_URI_FORMS:
        raise ValueError(f"unsupported URI scheme {scheme!r}; write it in lowercase, as "
                         f"{scheme.lower()}://{rest}")
    if scheme not in _DATA_URI_FORMS:
        raise ValueError(f"unsupported URI scheme {scheme!r}; {_DATA_PATH_FORMS}")
    if scheme == "file":
        valid = rest.startswith("/") and len(rest) > 1
    else:
        slash = rest.find("/")
        valid = slash not in (-1, 0, len(rest) - 1)
    if not valid:
        raise ValueError(_uri_form_message(scheme))
    return path


# The CRD keywords of a list whose items are keyed by a unique `name`: the API server rejects a
# repeated name (`Duplicate value`), and server-side apply merges such a list item by item. The
# key field must be required or defaulted.
NAMED_LIST_SCHEMA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["name"],
}
# The CRD keyword of a list of unique scalars: the API server rejects a repeated item.
SET_LIST_SCHEMA: dict[str, Any] = {"x-kubernetes-list-type": "set"}


def canonical_set(values: list[Any], key: Callable[[Any], Any] | None = None) -> list[Any]:
    """Sort a list whose order carries no meaning (SET_LIST_SCHEMA) by `key`.

    The stage key, the stage config and the outputs then do not depend on the order in which
    the items were written. Raise ValueError naming the items listed more than once, as the API
    server rejects them.
    """
    repeated = sorted({item for item in values if values.count(item) > 1}, key=key)
    if repeated:
        names = ", ".join(repr(item.value if isinstance(item, enum.Enum) else item)
                          for item in repeated)
        raise ValueError(f"{names} listed more than once; list each item once")
    return sorted(values, key=key)


# A path or URI of input data, which the stages resolve with lathe_trainer.stage.resolve_data_path.
DataPath = Annotated[
    str,
    AfterValidator(_check_data_path),
    WithJsonSchema({
        "type": "string",
        "minLength": 1,
        "maxLength": DATA_PATH_MAX_LENGTH,
        "x-kubernetes-validations": _DATA_PATH_RULES,
    }),
]


_STORAGE_URI = re.compile(r"^(file:///|pvc://[^/]+/|s3://[^/]+)")
_STORAGE_URI_FIX = (
    "use file:///absolute/path, pvc://<claim>/<path> or s3://<bucket>/<prefix>, or remove "
    "the field to use the default artifact store"
)


class StorageSpec(ApiModel):
    """Where a stage writes its artifacts."""

    uri: str | None = Field(
        default=None,
        max_length=DATA_PATH_MAX_LENGTH,
        json_schema_extra={"x-kubernetes-validations": [
            pattern_rule(_STORAGE_URI.pattern, _STORAGE_URI_FIX)
        ]},
        description=(
            "Output location: `file:///path`, `pvc://<claim>/<path>` or `s3://bucket/prefix`. "
            "When unset, the backend's artifact store decides (the workspace for `lathe run`)."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _check_scheme(cls, uri: str | None) -> str | None:
        return check_uri(uri, _STORAGE_URI, _STORAGE_URI_FIX)


def check_uri(uri: str | None, pattern: re.Pattern[str], fix: str) -> str | None:
    """Return `uri`, or raise ValueError with `fix` when it does not match `pattern`."""
    if uri is not None and not pattern.match(uri):
        raise ValueError(fix)
    return uri


class ConditionStatus(str, enum.Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """An observation of one aspect of the resource, per the Kubernetes API conventions."""

    type: str = Field(description="Condition type in CamelCase, such as `Succeeded`.")
    status: ConditionStatus = Field(strict=False, description="`True`, `False` or `Unknown`.")
    reason: str = Field(default="", description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail of the transition.")
    last_transition_time: str | None = Field(
        default=None, description="RFC 3339 time of the last status change."
    )
    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` this condition was computed from."
    )


class ArtifactStatus(ApiModel):
    """The output of a finished stage."""

    uri: str = Field(description="Location of the stage output directory.")
    digest: str = Field(description="`sha256:` digest over the output files, from the manifest.")


class Progress(ApiModel):
    """Live progress of a running training stage."""

    step: int | None = Field(default=None, description="Optimizer steps completed.")
    total_steps: int | None = Field(default=None, description="Optimizer steps requested.")
    tokens_seen: int | None = Field(default=None, description="Training tokens processed.")
    loss: float | None = Field(default=None, description="Most recent training loss.")
    tokens_per_second: float | None = Field(
        default=None, description="Training throughput over all processes."
    )
    eta_seconds: float | None = Field(default=None, description="Estimated seconds remaining.")
    non_finite_steps: int | None = Field(
        default=None,
        description="Steps with a NaN or infinite loss or gradient norm so far, which "
        "`training.nonFinite` skipped or rolled back; a FineTune counts those of its current "
        "phase.",
    )
    curriculum_stage: int | None = Field(
        default=None,
        description="PretrainJob: index, from 0, of the `curriculum` stage in training; unset "
        "without a curriculum.",
    )
    mfu: float | None = Field(
        default=None,
        description="Model FLOPs utilization, 0 to 1: model FLOPs per second over the peak of "
        "all GPUs. Unset on CPUs and on GPUs of unknown peak.",
    )
    message: str | None = Field(
        default=None,
        description="Latest message of the trainer, such as a skipped or rolled-back "
        "non-finite step or the start of a curriculum stage. It stays until the trainer "
        "reports another.",
    )
    updated_at: str | None = Field(default=None, description="RFC 3339 time of this report.")


class AttemptStatus(ApiModel):
    """One failed attempt of a stage workload."""

    attempt: int = Field(description="Attempt number, starting at 0.")
    exit_code: int | None = Field(default=None, description="Exit code of the failed process.")
    reason: str = Field(default="", description="Why the attempt failed, such as `OOMKilled`.")
    message: str = Field(default="", description="Detail from the termination message.")


class StageStatus(ApiModel):
    """Status common to every Lathe resource. The operator and `lathe run` write it."""

    model_config = ConfigDict(extra="allow")

    observed_generation: int | None = Field(
        default=None, description="The `metadata.generation` the status was last computed from."
    )
    phase: str | None = Field(
        default=None,
        description="Summary for printer columns, derived from the conditions: "
        "Pending, Waiting, Running, Succeeded, Failed, Suspended or Ready.",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Latest observations of the resource, one per type: the summary "
        "`Succeeded` (`Ready` for a ModelDeployment), `Failed`, `InputsReady`, `Running`, "
        "`Suspended` and, for a ModelDeployment, `Exported`.",
    )
    artifact: ArtifactStatus | None = Field(default=None, description="Output of the stage.")
    output_uri: str | None = Field(
        default=None,
        description="Where the latest run writes its output: spec.storage.uri, or a folder "
        "per run in the artifact store. `artifact.uri` is the same once the run succeeds.",
    )
    input_digests: dict[str, str] = Field(
        default_factory=dict,
        description="Digest of each input the latest run read, by role, such as `corpus`. An "
        "input that finishes again with another digest starts a new run.",
    )
    input_uris: dict[str, str] = Field(
        default_factory=dict,
        description="Artifact URI of each input the latest run read, by role. A run in "
        "progress goes on with these inputs while an input runs again or is deleted.",
    )
    progress: Progress | None = Field(default=None, description="Live training progress.")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Final metrics of the stage, such as perplexity or F1."
    )
    failed_attempts: list[AttemptStatus] = Field(
        default_factory=list, description="Exit codes and reasons of failed attempts."
    )
    restart_count: int = Field(
        default=0,
        description=(
            "Failed attempts retried so far; an attempt stopped by a suspension does not count."
        ),
    )


class PrinterColumn(BaseModel):
    """An `additionalPrinterColumns` entry of the generated CRD."""

    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


class Resource(BaseModel):
    """Base of the five top-level resources. Subclasses set the class variables and `spec`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    summary_condition: ClassVar[str] = "Succeeded"
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = ()

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str
    metadata: ObjectMeta
    # The file the resource was read from, for error messages; empty when it came from the API.
    _origin: str = PrivateAttr(default="")
    # Where in that file, such as "document 2 (line 9)"; empty when not read from a file.
    _position: str = PrivateAttr(default="")
    status: StageStatus | None = None

    def references(self) -> dict[str, tuple[str, str]]:
        """Return the inputs this resource waits for, as {role: (kind, name)}."""
        return {}

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.metadata.namespace}/{self.metadata.name}"

    @property
    def label(self) -> str:
        """The key, followed by the file the resource was read from when known."""
        return f"{self.key} (in {self._origin})" if self._origin else self.key
