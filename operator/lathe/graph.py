"""Order resources by their references, so every stage runs after its inputs."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from graphlib import CycleError, TopologicalSorter

from lathe.api import Resource
from lathe.errors import InvalidResourceError

# The spec field that holds each reference role, for error messages.
REFERENCE_FIELDS = {
    "corpus": "spec.corpusRef.name",
    "tokenizer": "spec.tokenizerRef.name",
    "baseModel": "spec.baseModel.pretrainJobRef.name",
    "model": "spec.model.fineTuneRef.name",
}


def upstream_key(resource: Resource, kind: str, name: str) -> str:
    return f"{kind}/{resource.metadata.namespace}/{name}"


def order(resources: list[Resource], finished: Collection[str] = (),
          workspace: str | None = None, unfinished: Mapping[str, str] | None = None,
          ) -> list[Resource]:
    """Return the resources in dependency order.

    `finished` holds the keys of resources that are not among `resources` but whose outputs
    exist (in the workspace named by `workspace`), so that a reference to one is resolved.
    `unfinished` says, by key, why a stage that ran in the workspace has no finished output.
    Raises InvalidResourceError for a reference to any other resource that is not among them,
    naming the field, and for a cycle.
    """
    by_key = {resource.key: resource for resource in resources}
    sorter: TopologicalSorter[str] = TopologicalSorter()
    for resource in resources:
        dependencies = []
        for role, (kind, name) in resource.references().items():
            key = upstream_key(resource, kind, name)
            if key in finished:
                continue
            if key not in by_key:
                reason = (unfinished or {}).get(key)
                if reason:
                    raise InvalidResourceError(
                        resource.label, REFERENCE_FIELDS.get(role, role),
                        f"references {kind} {name!r}, which is not defined in the files given, "
                        f"and {reason}; pass its file too with -f to run it again.",
                    )
                where = (f" and has no finished output in the workspace {workspace}"
                         if workspace else "")
                names = [other.metadata.name for other in resources if other.kind == kind
                         and other.metadata.namespace == resource.metadata.namespace]
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                fix = f"fix the name (did you mean {close[0]!r}?)" if close else "fix the name"
                raise InvalidResourceError(
                    resource.label,
                    REFERENCE_FIELDS.get(role, role),
                    f"references {kind} {name!r}, which is not defined in the files given"
                    f"{where}; pass its file too with -f, or {fix}.",
                )
            dependencies.append(key)
        sorter.add(resource.key, *dependencies)
    try:
        return [by_key[key] for key in sorter.static_order()]
    except CycleError as error:
        cycle = " -> ".join(error.args[1])
        raise InvalidResourceError(cycle, "references", "form a cycle; break it.") from None
