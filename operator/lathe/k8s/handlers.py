"""The kopf operator: thin handlers that call the Reconciler and patch status.

Run with `kopf run -m lathe.k8s.handlers` (the operator image does this). Handlers are
level-triggered `on.event` handlers, so kopf keeps no diff base or handler progress in the
object's annotations: re-applying the manifests from Git shows no difference, and a large spec is
never copied anywhere.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from lathe.api import GROUP, KINDS, VERSION
from lathe.k8s import metrics, progress
from lathe.k8s.reconcile import Reconciler
from lathe.k8s.settings import OperatorSettings

MANAGED_BY = {"app.kubernetes.io/managed-by": "lathe-operator"}
TRAINING_KINDS = ("PretrainJob", "FineTune")
STATE: dict[str, Any] = {}


def reconciler() -> Reconciler:
    return STATE["reconciler"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # NB: status-based storages keep kopf's own bookkeeping out of annotations, which the
    # user's Git manifests own; with only event and timer handlers there is little of it.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diff")
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    operator_settings = OperatorSettings.from_env()
    STATE["settings"] = operator_settings
    STATE["reconciler"] = Reconciler(operator_settings)
    if operator_settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            operator_settings.metrics_port, operator_settings.metrics_host,
            registry=metrics.REGISTRY,
        )
        logger.info("Serving Prometheus metrics on %s:%d.", operator_settings.metrics_host,
                    operator_settings.metrics_port)


def _reconcile(body: dict, logger: logging.Logger) -> dict[str, Any] | None:
    kind = body["kind"]
    started = time.monotonic()
    try:
        desired = reconciler().reconcile(body)
    except ApiException as error:
        metrics.RECONCILES.labels(kind, "error").inc()
        logger.warning("Reconcile failed with HTTP %s: %s; retrying on the next event or in "
                       "%.0f s.", error.status, error.reason, STATE["settings"].progress_interval_seconds)
        return None
    finally:
        metrics.RECONCILE_DURATION.labels(kind).observe(time.monotonic() - started)
    result = "waiting" if desired.get("phase") == "Waiting" else "success"
    metrics.RECONCILES.labels(kind, result).inc()
    meta = body["metadata"]
    metrics.PHASES.set(kind, meta.get("namespace", ""), meta["name"], desired.get("phase"))
    return desired


def _changes(current: dict, desired: dict) -> dict:
    return {key: value for key, value in desired.items() if current.get(key) != value}


def _announce(current: dict, desired: dict, logger: logging.Logger) -> None:
    """Post an event and a log line for every condition that changed status or reason."""
    before = {c["type"]: c for c in current.get("conditions") or []}
    for condition in desired.get("conditions") or []:
        old = before.get(condition["type"])
        if old and (old["status"], old["reason"]) == (condition["status"], condition["reason"]):
            continue
        text = f"{condition['type']}={condition['status']} ({condition['reason']}): {condition['message']}"
        if condition["type"] == "Failed" and condition["status"] == "True":
            logger.error(text)
        else:
            logger.info(text)


def on_resource_event(body, patch, logger, type, **_: Any) -> None:
    if type == "DELETED":
        return
    desired = _reconcile(dict(body), logger)
    if desired is None:
        return
    current = dict(body.get("status") or {})
    changes = _changes(current, desired)
    if changes:
        _announce(current, desired, logger)
        patch.status.update(changes)


def on_job_event(body, logger, type, **_: Any) -> None:
    """A Job owned by a Lathe resource changed: reconcile its owner."""
    for owner in body["metadata"].get("ownerReferences") or []:
        if not owner["apiVersion"].startswith(GROUP + "/") or owner["kind"] not in KINDS:
            continue
        namespace = body["metadata"]["namespace"]
        api = kubernetes.client.CustomObjectsApi()
        try:
            parent = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, KINDS[owner["kind"]].plural, owner["name"]
            )
        except ApiException as error:
            if error.status == 404:
                return
            raise
        if parent["metadata"]["uid"] != owner["uid"] or parent["metadata"].get("deletionTimestamp"):
            return
        desired = _reconcile(parent, logger)
        if desired is None:
            return
        current = parent.get("status") or {}
        changes = _changes(current, desired)
        if changes:
            _announce(current, desired, logger)
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, KINDS[owner["kind"]].plural, owner["name"],
                {"status": changes},
            )


def refresh_progress(body, patch, **_: Any) -> None:
    """Copy the latest training progress from the artifact store into status and metrics."""
    current = body.get("status") or {}
    if current.get("phase") != "Running" or not current.get("attemptGeneration"):
        return
    settings: OperatorSettings = STATE["settings"]
    uri = reconciler().store.output_uri(
        body["metadata"]["namespace"], body["kind"], body["metadata"]["name"]
    )
    uri = (body.get("spec") or {}).get("storage", {}).get("uri") or uri
    record = progress.read_latest(uri, mounts=_mounts(settings))
    if not record:
        return
    values = progress.to_status(record)
    if values != current.get("progress"):
        patch.status["progress"] = values
    meta = body["metadata"]
    metrics.set_progress(meta["namespace"], body["kind"], meta["name"], values)


def _mounts(settings: OperatorSettings) -> dict[str, str]:
    """Claims the operator pod mounts, as {claim: mount path}, from LATHE_MOUNTS."""
    import os

    pairs = [item.split("=", 1) for item in os.environ.get("LATHE_MOUNTS", "").split(",") if item]
    return {claim: path for claim, path in pairs}


def forget_resource(body, logger, **_: Any) -> None:
    """Deletion cleanup: drop the resource's metric series. Owned objects go with the owner."""
    meta = body["metadata"]
    metrics.forget(meta.get("namespace", ""), body["kind"], meta["name"])
    metrics.PHASES.set(body["kind"], meta.get("namespace", ""), meta["name"], None)
    logger.info("Removed the metric series of the deleted resource; Kubernetes garbage "
                "collection removes the objects it owned.")


def register() -> None:
    for model in KINDS.values():
        kopf.on.event(GROUP, VERSION, model.plural)(on_resource_event)
        kopf.on.delete(GROUP, VERSION, model.plural, optional=True)(forget_resource)
        if model.kind_name in TRAINING_KINDS:
            kopf.timer(
                GROUP, VERSION, model.plural,
                interval=OperatorSettings.from_env().progress_interval_seconds,
                idle=None,
            )(refresh_progress)
    kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY)(on_job_event)


register()
