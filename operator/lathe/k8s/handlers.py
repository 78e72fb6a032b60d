"""The kopf operator: thin handlers that call the Reconciler and patch status.

Run with `kopf run -m lathe.k8s.handlers` (the operator image does this). Handlers are
level-triggered `on.event` handlers, so kopf keeps no diff base or handler progress in the
object's annotations: re-applying the manifests from Git shows no difference, and a large spec is
never copied anywhere.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import kopf
import kubernetes
from kopf._core.engines import posting
from kubernetes.client.exceptions import ApiException

from lathe.api import GROUP, KINDS, VERSION
from lathe.k8s import builders_training, leader, metrics, progress
from lathe import __version__, status
from lathe.k8s.builders import ArtifactStore
from lathe.k8s.reconcile import Reconciler, api_message, job_overdue, parse
from lathe.k8s.settings import OperatorSettings

MANAGED_BY = {"app.kubernetes.io/managed-by": "lathe-operator"}
TRAINING_KINDS = ("PretrainJob", "FineTune")
# Seconds between resyncs of resources that wait for inputs; wake-ups normally come sooner.
RESYNC_SECONDS = 30.0
# Seconds before a reconcile that failed (an API error) runs again, if no event comes first.
# The delay doubles with each failure in a row, up to RETRY_MAX_SECONDS, as a controller-runtime
# work queue backs off.
RETRY_SECONDS = 10.0
RETRY_MAX_SECONDS = 300.0
STATE: dict[str, Any] = {}


def reconciler() -> Reconciler:
    return STATE["reconciler"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    try:
        operator_settings = OperatorSettings.from_env()
        ArtifactStore(operator_settings.artifact_root)
    except ValueError as error:
        # A retry cannot fix the environment, so the operator exits and its pod shows the error,
        # instead of running without reconciling anything.
        STATE["invalid_settings"] = str(error)
        raise kopf.PermanentError(f"The operator's settings are invalid: {error}") from error
    # NB: status-based storages keep kopf's own bookkeeping out of annotations, because the
    # user's Git manifests own those. With only event and timer handlers there is little of it.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(field="status.kopf.diff")
    settings.posting.level = logging.INFO
    # Events name the operator and its pod as their source (`kubectl describe`: From), not kopf.
    settings.posting.reporting_component = "lathe-operator"
    settings.posting.reporting_instance = socket.gethostname()
    settings.execution.max_workers = 16
    if os.environ.get("LATHE_WATCH_NAMESPACES"):
        # Namespaced mode grants no list on namespaces. kopf would retry listing them for about
        # a minute before it served the namespaces it was given, at every start and takeover.
        settings.scanning.disabled = True
    STATE["kopf_settings"] = settings
    settings.watching.server_timeout = 300
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        # NB: the client reads $KUBECONFIG when it is imported; read it again here.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    # The kubernetes client (37) keeps at most 5 connections per CPU by default. With more handler
    # threads than that, it drops connections after use and opens new TLS connections.
    client_configuration = kubernetes.client.Configuration.get_default_copy()
    client_configuration.connection_pool_maxsize = max(
        client_configuration.connection_pool_maxsize or 0, settings.execution.max_workers
    )
    kubernetes.client.Configuration.set_default(client_configuration)
    STATE["settings"] = operator_settings
    logger.info("Lathe operator %s is starting with artifact root %s, data root %s, trainer "
                "image %s, Triton image %s and Kueue queue %s.", __version__,
                operator_settings.artifact_root, operator_settings.data_root,
                operator_settings.trainer_image, operator_settings.triton_image,
                operator_settings.queue_name or "none")
    STATE["reconciler"] = Reconciler(operator_settings)
    if operator_settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            operator_settings.metrics_port, operator_settings.metrics_host,
            registry=metrics.REGISTRY,
        )
        logger.info("Serving Prometheus metrics on %s:%d.", operator_settings.metrics_host,
                    operator_settings.metrics_port)
    if operator_settings.leader_election is None:
        metrics.LEADER.set(1)


@kopf.on.startup()
async def wait_for_leadership(logger: logging.Logger, **_: Any) -> None:
    """Hold kopf's start (its watches, and the periodic pass below) until this pod leads.

    kopf runs startup handlers one after another in the order they are registered, and starts
    watching only after the last one returns.
    """
    # NB: kopf stops the operator only once every startup handler has succeeded or failed
    # permanently, so this one must not wait for settings that will never load.
    if "invalid_settings" in STATE:
        raise kopf.PermanentError("Leader election did not start, because the operator's "
                                  "settings are invalid.")
    if "settings" not in STATE:
        raise kopf.TemporaryError("Waiting for the operator's settings, because configure has "
                                  "not succeeded yet.", delay=5)
    election = STATE["settings"].leader_election
    if election is None:
        return
    # kopf retries a startup handler that raised; the election thread of the first try goes on.
    elector = STATE.get("elector") or leader.LeaderElector(election, logger)
    STATE["elector"] = elector
    await elector.wait_until_leading()


@kopf.on.startup()
async def start_periodic_pass(**_: Any) -> None:
    """Keep kopf's event loop, so that handler threads can schedule reconciles on it, and start
    the periodic pass."""
    STATE["loop"] = asyncio.get_running_loop()
    STATE["periodic"] = asyncio.create_task(periodic_pass(logging.getLogger("kopf.objects")))


@kopf.on.cleanup()
async def stop_periodic_pass(**_: Any) -> None:
    task = STATE.pop("periodic", None)
    if task is not None:
        task.cancel()


@kopf.on.cleanup()
async def release_leadership(logger: logging.Logger, **_: Any) -> None:
    """Stop reconciling, wait for the reconciles that run, then hand the Lease over.

    NB: kopf cancels its handler tasks at shutdown, but a reconcile that already runs on a
    handler thread goes on. Releasing the Lease before it ends would let the next leader
    reconcile the same resource at the same time.
    """
    STATE["stopping"] = True
    for handle in _RETRY_PENDING.values():
        handle.cancel()
    _RETRY_PENDING.clear()
    elector = STATE.pop("elector", None)
    if elector is None:
        return
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while _ACTIVE_CALLS.value and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if _ACTIVE_CALLS.value:
        logger.warning("%d reconciles still run after %.0f s; keeping Lease %s until it "
                       "expires instead of releasing it.", _ACTIVE_CALLS.value,
                       STOP_WAIT_SECONDS, elector.lease)
        return
    await asyncio.to_thread(elector.release)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in from the pod's service account, else from $KUBECONFIG as it is now.

    kopf's default login goes through the kubernetes client, which reads $KUBECONFIG once at
    import; reading it at login lets the test suite point the operator at its own cluster.
    """
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _reconcile(body: dict, logger: logging.Logger) -> dict[str, Any] | None:
    kind = body["kind"]
    started = time.monotonic()
    try:
        desired = reconciler().reconcile(body)
    except ApiException as error:
        metrics.RECONCILES.labels(kind, "error").inc()
        _report_failure(body, error, logger)
        return None
    except Exception as error:  # noqa: BLE001 - a bug: reported, counted and retried
        metrics.RECONCILES.labels(kind, "error").inc()
        logger.exception("Reconcile failed with an internal error.")
        _report_failure(body, error, logger)
        return None
    finally:
        metrics.RECONCILE_DURATION.labels(kind).observe(time.monotonic() - started)
    result = "waiting" if desired.get("phase") == "Waiting" else "success"
    metrics.RECONCILES.labels(kind, result).inc()
    return desired


# Failed reconciles in a row, the cause of the last Warning Event about them, when it was
# posted (time.monotonic()) and the message for status, by resource uid.
# A successful reconcile clears the entry.
_FAILURES: dict[str, tuple[int, str, float, str]] = {}
# Seconds after which a lasting failure's Warning Event is posted again: kube-apiserver deletes
# Events after --event-ttl (1 h by default), and `kubectl describe` should still show it.
REPOST_SECONDS = 1800.0


def _report_failure(body: dict, error: Exception, logger: logging.Logger) -> None:
    """Log a failed reconcile and post a Warning Event, once per distinct error in a row and
    again every REPOST_SECONDS while it lasts.

    NB: without the Event, a request the API server rejects (a ResourceQuota, an admission
    webhook, missing RBAC) shows only in the operator's log, not in `kubectl describe`.
    """
    uid = body["metadata"]["uid"]
    failures, posted, posted_at, _ = _FAILURES.get(uid, (0, "", 0.0, ""))
    retry = f"Retrying in {retry_delay(failures + 1):.0f} s or on the next change"
    if isinstance(error, ApiException):
        cause = f"HTTP {error.status} ({api_message(error)})"
        failed = f"Reconciling failed: the API server answered {cause}."
        fix = "fix the cause (quota, admission policy or the operator's RBAC) to let it proceed."
    else:
        cause = f"{type(error).__name__}: {error}"
        failed = f"Reconciling failed with an internal error of the operator ({cause})."
        fix = "report it with the operator's log, which has the traceback."
    text = f"{failed} {retry}; {fix}"
    logger.warning(text)
    now = time.monotonic()
    if cause != posted or now - posted_at >= REPOST_SECONDS:
        kopf.warn(body, reason=status.Reason.RECONCILE_FAILED, message=text)
        posted_at = now
    _FAILURES[uid] = (failures + 1, cause, posted_at,
                      f"{failed} The operator retries with backoff; {fix}")


def retry_delay(failures: int) -> float:
    """Seconds before the next try after `failures` failed reconciles in a row."""
    return min(RETRY_SECONDS * 2 ** max(failures - 1, 0), RETRY_MAX_SECONDS)


def _changes(current: dict, desired: dict) -> dict:
    """Return the JSON merge patch (RFC 7386) that turns `current` into `desired`.

    A key that `desired` drops, such as the artifact of a finished run when a new run starts,
    or a role that a spec no longer references, becomes null, which deletes it.
    """
    patch: dict = {key: None for key in current.keys() - desired.keys()}
    for key, value in desired.items():
        before = current.get(key)
        if before == value:
            continue
        if isinstance(value, dict) and isinstance(before, dict):
            patch[key] = _changes(before, value)
        else:
            patch[key] = value
    return patch


# Condition types from the least to the most telling; the last one that changed names the Event.
EVENT_ORDER = ("InputsReady", "Suspended", "Running", "Exported", "Ready", "Succeeded", "Failed")
# Reasons whose new message reports a new event of the same kind: another failed attempt,
# another Job, or another cause of pods not starting. A changed message alone posts an Event
# for these. Other reasons refresh their message as a count changes (JobRunning's active pods,
# ServerNotReady's ready replicas), which would post an Event on every refresh.
MESSAGE_EVENT_REASONS = frozenset({
    status.Reason.ATTEMPT_RESTARTED, status.Reason.JOB_CREATED, status.Reason.PODS_NOT_STARTING,
})


def _condition_changed(old: dict | None, new: dict) -> bool:
    """Return whether a condition's status or reason changed, or, for a Running condition with
    one of MESSAGE_EVENT_REASONS, its message.

    Only Running's messages name a new attempt, Job or cause. A ModelDeployment's Ready
    message also counts ready replicas, so comparing it would post an Event at every change.
    """
    if old is None or (old["status"], old["reason"]) != (new["status"], new["reason"]):
        return True
    return (new["type"] == "Running" and new["reason"] in MESSAGE_EVENT_REASONS
            and old.get("message") != new.get("message"))


def _announce(body: dict, current: dict, desired: dict, logger: logging.Logger) -> None:
    """Log every condition that changed and post one Kubernetes Event for them.

    The Event's reason is that of the changed condition that comes last in EVENT_ORDER, and
    its message lists every change in that order. So a reconcile that creates a Job, or finds
    one finished, posts one Event.
    NB: kopf turns log lines of event and timer handlers into no Events, so they are posted
    here explicitly.
    """
    before = {c["type"]: c for c in current.get("conditions") or []}
    changed = []
    for condition in desired.get("conditions") or []:
        if not _condition_changed(before.get(condition["type"]), condition):
            continue
        changed.append(condition)
        text = f"{condition['type']}={condition['status']}: {condition['message']}"
        if condition["type"] == "Failed" and condition["status"] == "True":
            logger.error(text)
        else:
            logger.info(text)
    if not changed:
        return
    changed.sort(key=lambda c: EVENT_ORDER.index(c["type"]) if c["type"] in EVENT_ORDER else -1)
    message = " ".join(f"{c['type']}={c['status']}: {c['message']}" for c in changed)
    failed = any(c["type"] == "Failed" and c["status"] == "True" for c in changed)
    # A failed attempt that is retried and pods that cannot start need attention too, so they
    # are listed by kubectl get events --field-selector type=Warning.
    warning_reasons = {status.Reason.PODS_NOT_STARTING, status.Reason.ATTEMPT_RESTARTED}
    stuck = any(c["reason"] in warning_reasons for c in changed)
    post = kopf.warn if failed or stuck else kopf.info
    post(body, reason=changed[-1]["reason"], message=message)


# Reconciles of one resource run one at a time, whatever triggered them: its own events, its
# Jobs' events, a wake-up from an input or a resync. A trigger that arrives during a run requests
# one more run, as a controller-runtime work queue does. Each run reads the resource and writes
# its status before the next starts, so no run works from an older status than the last write.
# Both sets are touched only from kopf's event loop thread.
_RUNNING: set[tuple[str, str, str]] = set()
_AGAIN: set[tuple[str, str, str]] = set()
# The resourceVersion of each resource's last status write, by uid: the watch event that brings
# that write back has nothing new to reconcile.
_WRITTEN: dict[str, str] = {}


async def reconcile_key(namespace: str, plural: str, name: str, logger: logging.Logger,
                        latest: dict | None = None) -> None:  # fmt: skip
    """Reconcile the stored resource now, or once more after the reconcile that is running.

    `latest` is a body known to be the newest version, which saves the first read.
    """
    key = (namespace, plural, name)
    if key in _RUNNING:
        _AGAIN.add(key)
        return
    _RUNNING.add(key)
    try:
        while True:
            _AGAIN.discard(key)
            try:
                done = await _in_thread(_reconcile_latest, namespace, plural, name, logger,
                                        latest)  # fmt: skip
            except Exception:  # noqa: BLE001 - logged here, retried below
                # _reconcile reports errors of the reconcile itself; this is one around it.
                logger.exception("Reconcile failed; retrying with backoff or on the next change.")
                _count_failure((_INDEX.get(key) or {}).get("uid"))
                done = False
            latest = None
            if done:
                _cancel_retry(key)
            elif key not in _AGAIN:
                _retry_later(key, logger)
                return
            # NB: a change that arrived during a failed run is reconciled now, not after the
            # backoff, as the ReconcileFailed Event promises.
            if key not in _AGAIN:
                return
    finally:
        _RUNNING.discard(key)


def _retry_later(key: tuple[str, str, str], logger: logging.Logger) -> None:
    """Run the reconcile of key again after its backoff delay, in the current context."""
    if key in _RETRY_PENDING:
        return  # one retry per resource at a time, however many reconciles failed meanwhile
    loop = asyncio.get_running_loop()
    uid = (_INDEX.get(key) or {}).get("uid")
    delay = retry_delay(_FAILURES[uid][0]) if uid in _FAILURES else RETRY_SECONDS

    def retry() -> None:
        _RETRY_PENDING.pop(key, None)
        _keep(loop.create_task(reconcile_key(*key, logger)))

    _RETRY_PENDING[key] = loop.call_later(delay, retry)


def _cancel_retry(key: tuple[str, str, str]) -> None:
    """Drop the scheduled retry of a resource whose reconcile has just succeeded."""
    handle = _RETRY_PENDING.pop(key, None)
    if handle is not None:
        handle.cancel()


# The scheduled retry of each resource whose last reconcile failed; touched only from the loop.
_RETRY_PENDING: dict[tuple[str, str, str], asyncio.TimerHandle] = {}


# Tasks started outside a kopf handler, kept until they finish so that they are not collected.
_TASKS: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> None:
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


def _reconcile_latest(namespace: str, plural: str, name: str, logger: logging.Logger,
                      latest: dict | None = None) -> bool:  # fmt: skip
    """Read the resource (unless `latest` is given) and reconcile it; return False to retry."""
    api = reconciler().api.custom
    body = latest
    if body is None:
        try:
            body = api.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                # Gone, and its DELETED event may have been missed across a watch restart.
                _forget_gone(namespace, plural, name)
                return True
            logger.warning("Reading the resource failed with HTTP %s: %s; retrying with "
                           "backoff or on the next change.", error.status, error.reason)
            _count_failure((_INDEX.get((namespace, plural, name)) or {}).get("uid"))
            return False
    return _reconcile_stored(api, body, logger)


def _count_failure(uid: str | None) -> None:
    """Count a failed read or status write toward the resource's retry backoff."""
    if uid:
        failures, posted, posted_at, message = _FAILURES.get(uid, (0, "", 0.0, ""))
        _FAILURES[uid] = (failures + 1, posted, posted_at, message)


async def on_resource_event(body, logger, type, **_: Any) -> None:
    meta = body["metadata"]
    if type == "DELETED":
        _WRITTEN.pop(meta["uid"], None)
        _FAILURES.pop(meta["uid"], None)
        with _INDEX_LOCK:
            _INDEX.pop(_key(body), None)
            forget_resource(body, logger)
        if not STATE.get("stopping"):
            reconciler().forget_upstream(meta["namespace"], KINDS[body["kind"]].plural,
                                         meta["name"])
            try:
                await _in_thread(_wake_dependents, body, logger, every=True)
            except ApiException as error:
                logger.warning("Listing the resources that read the deleted resource failed "
                               "with HTTP %s: %s; they notice at their next resync.",
                               error.status, error.reason)
        return
    _remember(body)
    _keep_posting_context()
    written = _WRITTEN.get(meta["uid"])
    if written == meta.get("resourceVersion"):
        return
    # Until the operator has written this resource's status, the event's body is its newest
    # version. After a write, an event may be older than the write, so the body is read again.
    latest = copy.deepcopy(dict(body)) if written is None else None
    await reconcile_key(meta["namespace"], KINDS[body["kind"]].plural, meta["name"],
                        resource_logger(body["kind"], meta["namespace"], meta["name"]), latest)


def _wake_dependents(body: dict, logger: logging.Logger, every: bool = False) -> None:
    """Reconcile the resources that read this one and have not run on its current output: those
    that wait for it, and those whose last run read an earlier output. They then start without a
    resync.

    With `every`, for a resource that was deleted or started a new run, reconcile all that read
    it, so that their InputsReady condition shows that they wait for it.
    """
    api = reconciler().api.custom
    namespace = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    digest = ((body.get("status") or {}).get("artifact") or {}).get("digest")
    loop = STATE.get("loop")
    for model in KINDS.values():
        for item in _list(api, namespace, model.plural):
            roles = [role for role, reference in reconciler_roles(item).items()
                     if reference == (body["kind"], name)]
            if not roles:
                continue
            item_status = item.get("status") or {}
            waiting = not status.condition_true(item_status.get("conditions") or [],
                                                "InputsReady")
            read = item_status.get("inputDigests") or {}
            outdated = any(role in read and read[role] != digest for role in roles)
            if not (every or waiting or outdated):
                continue
            item_logger = resource_logger(model.kind_name, namespace, item["metadata"]["name"])
            if loop is None:
                _reconcile_stored(api, item, item_logger)
            else:
                asyncio.run_coroutine_threadsafe(
                    reconcile_key(namespace, model.plural, item["metadata"]["name"], item_logger),
                    loop,
                )


def _list(api, namespace: str, plural: str) -> list[dict]:
    return api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]


def reconciler_roles(body: dict) -> dict[str, tuple[str, str]]:
    """Return the inputs an object reads, as {role: (kind, name)}."""
    try:
        return parse(body).references()
    except Exception:  # noqa: BLE001 - an invalid object references nothing
        return {}


def _reconcile_stored(api, parent: dict, logger: logging.Logger) -> bool:
    """Reconcile an object read from the API server and write its status there.

    Return False when the reconcile failed with an API error, so the caller retries it.
    """
    meta = parent["metadata"]
    if meta.get("deletionTimestamp"):
        return True
    desired = _reconcile(parent, logger)
    if desired is None:
        if not (parent.get("status") or {}).get("conditions"):
            _show_first_failure(api, parent, logger)
        return False
    current = parent.get("status") or {}
    changes = _changes(current, desired)
    summary = KINDS[parent["kind"]].summary_condition
    if changes:
        try:
            stored = api.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], KINDS[parent["kind"]].plural, meta["name"],
                {"status": changes},
            )
        except ApiException as error:
            if error.status == 404:
                _forget_gone(meta["namespace"], KINDS[parent["kind"]].plural, meta["name"])
                return True
            logger.warning("Writing the status failed with HTTP %s: %s; retrying with "
                           "backoff or on the next change.", error.status, error.reason)
            _count_failure(meta["uid"])
            return False
        # NB: a spec changed between the read and this write comes back in the same object.
        # Its event must then be reconciled, so the write is recorded with no echo to skip.
        same_spec = stored["metadata"].get("generation") == meta.get("generation")
        _WRITTEN[meta["uid"]] = stored["metadata"]["resourceVersion"] if same_spec else ""
        _record_phase(parent, desired.get("phase"), stored)
        ended = training_ended(current, desired)
        if ended:
            metrics.forget(meta["namespace"], parent["kind"], meta["name"])
        if ended or current.get("jobName") != desired.get("jobName"):
            # The Job of the warning ended, or a new attempt replaced it.
            _forget_unreachable(meta["namespace"], current.get("jobName"))
        # Events go out after the write, so that a failed post never holds back the status.
        _announce(parent, current, desired, logger)
    else:
        _record_phase(parent, desired.get("phase"))
    # The reconcile and its status write both succeeded, so the backoff starts over.
    _FAILURES.pop(meta["uid"], None)
    if status.condition_true(desired.get("conditions") or [], summary):
        _wake_dependents({**parent, "status": desired}, logger)
    elif status.condition_true(current.get("conditions") or [], summary):
        # A new run started, so the resources that read the finished output wait for it.
        reconciler().forget_upstream(meta["namespace"], KINDS[parent["kind"]].plural,
                                     meta["name"])
        _wake_dependents({**parent, "status": desired}, logger, every=True)
    elif (status.condition_true(desired.get("conditions") or [], "Failed")
          and not status.condition_true(current.get("conditions") or [], "Failed")):
        # The resources that wait for this one report the failure now, not at the next resync.
        _wake_dependents({**parent, "status": desired}, logger)
    return True


def _forget_unreachable(namespace: str, job: str | None) -> None:
    """Forget the warning about a Job that ended, was replaced or was deleted."""
    if job:
        _UNREACHABLE_JOBS.discard((namespace, job))


def training_ended(current: dict, desired: dict) -> bool:
    """Return whether a status change ends the run that the training gauges describe.

    A new run drops the previous run's progress, a finished run sets phase Succeeded or
    Failed, and a suspended one sets phase Suspended. Its gauges then go, so that a sum of
    tokens per second counts running jobs only and no ETA stays frozen. A resumed run sets
    them again with its next progress record.
    """
    finished = (status.Phase.SUCCEEDED, status.Phase.FAILED, status.Phase.SUSPENDED)
    return bool(current.get("progress") and not desired.get("progress")) or (
        desired.get("phase") in finished and current.get("phase") not in finished
    )


def _show_first_failure(api, body: dict, logger: logging.Logger) -> None:
    """Write a failed reconcile into a status that has no conditions yet, as the summary
    condition with status Unknown and reason ReconcileFailed.

    NB: without it, a resource whose first reconcile the API server rejects (a ResourceQuota,
    an admission webhook) shows no phase in `kubectl get`. The next reconcile that succeeds
    drops the condition.
    """
    meta = body["metadata"]
    entry = _FAILURES.get(meta["uid"])
    if entry is None:
        return
    model = KINDS[body["kind"]]
    conditions = status.set_condition([], model.summary_condition, "Unknown",
                                      status.Reason.RECONCILE_FAILED, entry[3],
                                      meta.get("generation"))
    try:
        stored = api.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], model.plural, meta["name"],
            # With observedGeneration set, Argo CD's health check shows the condition's message.
            {"status": {"phase": status.Phase.PENDING, "conditions": conditions,
                        "observedGeneration": meta.get("generation")}},
        )
    except ApiException as error:
        if error.status != 404:  # a deleted resource needs no status
            logger.warning("Writing the ReconcileFailed condition failed with HTTP %s: %s; the "
                           "Warning Event still gives the cause.", error.status, error.reason)
        return
    if stored["metadata"].get("generation") == meta.get("generation"):
        _WRITTEN[meta["uid"]] = stored["metadata"]["resourceVersion"]
    _record_phase(body, status.Phase.PENDING, stored)


async def _in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking work on kopf's handler threads, as kopf runs a sync handler.

    NB: the context is copied so that kopf.info and kopf.warn find kopf's event queue.
    """
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    return await loop.run_in_executor(STATE["kopf_settings"].execution.executor,
                                      functools.partial(_counted, call))


class _Counter:
    """A count shared by kopf's handler threads and its event loop."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, amount: int) -> None:
        with self._lock:
            self.value += amount


# Calls running on handler threads; release_leadership waits until none runs.
_ACTIVE_CALLS = _Counter()
# Seconds release_leadership waits for them, within the pod's 30 s termination grace period.
STOP_WAIT_SECONDS = 20.0


def _counted(call: Callable[[], Any]) -> Any:
    if STATE.get("stopping"):
        # Queued before the operator began to stop: its awaiting task is cancelled by now.
        raise asyncio.CancelledError
    _ACTIVE_CALLS.add(1)
    try:
        return call()
    finally:
        _ACTIVE_CALLS.add(-1)


# The last state of each managed Job that a reconcile read, by uid. Most Job events change only
# fields the reconciler ignores (ready pods, start time, uncounted pods), so they are skipped.
_SEEN_JOBS: dict[str, tuple] = {}


def _job_state(body: dict) -> tuple:
    """Return what the reconciler reads from a Job: suspend, pod counts and conditions."""
    job_status = body.get("status") or {}
    return (
        bool((body.get("spec") or {}).get("suspend")),
        job_status.get("active") or 0,
        job_status.get("succeeded") or 0,
        job_status.get("failed") or 0,
        tuple(sorted((c.get("type"), c.get("status")) for c in job_status.get("conditions") or [])),
    )


def _cached_job(body: dict) -> dict:
    """Return the fields of a Job that the reconciler reads, for its Job cache."""
    meta = body["metadata"]
    job_status = body.get("status") or {}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid", "labels",
                                                "ownerReferences") if key in meta},
        "spec": {"suspend": (body.get("spec") or {}).get("suspend"), "template": {}},
        "status": {key: job_status[key] for key in ("active", "ready", "succeeded", "failed",
                                                    "startTime", "conditions")
                   if key in job_status},
    }


# A Job's state before its first pod: nothing that the reconcile that created it has not seen.
_NEW_JOB = (0, 0, 0, ())


async def on_job_event(body, logger, type, **_: Any) -> None:
    """Reconcile the Lathe resource that owns a Job, when what the reconciler reads changed."""
    uid = body["metadata"]["uid"]
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    state = None if type == "DELETED" else _job_state(body)
    if state is None:
        reconciler().jobs.pop(key, None)
    else:
        reconciler().jobs[key] = (time.monotonic(), _cached_job(body))
    if state is not None and _SEEN_JOBS.get(uid) == state:
        return
    if state is not None and uid not in _SEEN_JOBS and state[1:] == _NEW_JOB:
        # NB: after an operator restart, the owner's own event reconciles it anyway.
        _SEEN_JOBS[uid] = state
        return
    await _reconcile_owners(body)
    # NB: the state is recorded even when that reconcile failed or only requested one more run,
    # because reconcile_key retries a failed reconcile and the requested run reads this Job again.
    if state is None:
        _SEEN_JOBS.pop(uid, None)
    else:
        _SEEN_JOBS[uid] = state


async def _reconcile_owners(body: dict) -> None:
    """Reconcile the Lathe resources that own the object `body`."""
    for owner in body["metadata"].get("ownerReferences") or []:
        if owner["apiVersion"].startswith(GROUP + "/") and owner["kind"] in KINDS:
            namespace = body["metadata"]["namespace"]
            await reconcile_key(namespace, KINDS[owner["kind"]].plural, owner["name"],
                                resource_logger(owner["kind"], namespace, owner["name"]))


# The last state of each Triton Deployment, Service and HorizontalPodAutoscaler that the
# operator saw, by uid.
_SEEN_SERVING: dict[str, tuple] = {}


def _serving_state(body: dict) -> tuple:
    """Return what the ModelDeployment's reconcile reads or restores of a Triton object: the
    replicas of a Deployment (a `kubectl scale` is undone) and how many are ready, the spec
    of a HorizontalPodAutoscaler, and the ports and selector of a Service (an edit of either
    is undone)."""
    if body["kind"] == "HorizontalPodAutoscaler":
        # The HPA controller writes only the status, so the spec changes only by an edit.
        return (json.dumps(body.get("spec") or {}, sort_keys=True),)
    if body["kind"] == "Service":
        spec = body.get("spec") or {}
        ports = tuple((port.get("name"), port.get("port"), str(port.get("targetPort")))
                      for port in spec.get("ports") or [])
        return (ports, tuple(sorted((spec.get("selector") or {}).items())))
    if body["kind"] != "Deployment":
        return ()
    deployment_status = body.get("status") or {}
    return ((body.get("spec") or {}).get("replicas"), deployment_status.get("readyReplicas") or 0)


async def on_serving_event(body, logger, type, **_: Any) -> None:
    """Reconcile the ModelDeployment that owns a Triton Deployment, Service or
    HorizontalPodAutoscaler when the object was deleted, scaled or edited by hand, or its
    ready replicas changed, so that `Ready` follows the pods and a deleted object is created
    again."""
    uid = body["metadata"]["uid"]
    state = None if type == "DELETED" else _serving_state(body)
    seen = _SEEN_SERVING.get(uid)
    if state is None:
        _SEEN_SERVING.pop(uid, None)
    else:
        _SEEN_SERVING[uid] = state
    if state is not None and (seen is None or seen == state):
        # The reconcile that created the object has seen it already.
        return
    await _reconcile_owners(body)


# The fields of each known resource that the periodic pass reads, kept from its watch events and
# the operator's own status writes. kopf adds a finalizer to every object with a timer handler,
# so one operator-wide pass replaces a timer per resource: no deletion waits for the operator.
_INDEX: dict[tuple[str, str, str], dict[str, Any]] = {}
# Held while a resource's _INDEX entry and phase series change together, so that a reconcile
# thread that ends after the resource's DELETED event cannot set its series again.
_INDEX_LOCK = threading.Lock()
# Progress files read at once by the periodic pass; each is one artifact-store request.
PROGRESS_READS = 8


def _key(body: dict) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta.get("namespace", ""), KINDS[body["kind"]].plural, meta["name"]


def _remember(body: dict) -> None:
    current = body.get("status") or {}
    _INDEX[_key(body)] = {
        "kind": body["kind"],
        "uid": body["metadata"]["uid"],
        "generation": body["metadata"].get("generation"),
        "phase": current.get("phase"),
        "running": bool(current.get("runGeneration")),
        "progress": current.get("progress"),
        "storage": ((body.get("spec") or {}).get("storage") or {}).get("uri"),
        "output": current.get("outputUri"),
        "job": current.get("jobName"),
    }


def _pods_late(namespace: str, entry: dict[str, Any]) -> bool:
    """Return True when the cached Job of a running resource has pods that are not ready past
    the start grace, so that a reconcile looks at the pods for the reason."""
    cached = reconciler().jobs.get((namespace, entry["job"])) if entry.get("job") else None
    if cached is None:
        return False
    job_status = cached[1]["status"]
    return job_overdue(job_status.get("active"), job_status.get("ready"),
                       job_status.get("succeeded"), job_status.get("failed"),
                       bool(cached[1]["spec"].get("suspend")), job_status.get("startTime"))


class _ResourceLogger(logging.LoggerAdapter):
    """Log lines about one resource, prefixed with its kind, namespace and name."""

    def process(self, msg, kwargs):
        return f"[{self.extra['resource']}] {msg}", kwargs


def resource_logger(kind: str, namespace: str, name: str) -> logging.LoggerAdapter:
    """Return the logger for the lines of a reconcile of one resource.

    NB: kopf's per-object logger names the object of the event, which for a Job event is the
    Job, and leaves out the kind, which a FineTune and a ModelDeployment of one name share.
    """
    return _ResourceLogger(logging.getLogger("kopf.objects"),
                           {"resource": f"{kind} {namespace}/{name}"})


def _has_posting_context() -> bool:
    try:
        posting.event_queue_var.get()
    except LookupError:
        return False
    return True


def _keep_posting_context() -> None:
    """Keep the event queue that kopf gives its handlers, for reconciles the periodic pass starts.

    NB: kopf.info and kopf.warn find kopf's event queue through context variables that kopf sets
    only in the tasks that run its handlers (kopf 1.45), not in a task of a startup handler.
    """
    if "posting" not in STATE:
        STATE["posting"] = (posting.event_queue_loop_var.get(), posting.event_queue_var.get())


async def periodic_pass(logger: logging.Logger) -> None:
    """Copy training progress into status every progress interval, and reconcile the resources
    that wait for inputs every RESYNC_SECONDS, in case a wake-up was missed."""
    settings: OperatorSettings = STATE.get("settings") or OperatorSettings.from_env()
    last_resync = time.monotonic()
    reads = asyncio.Semaphore(PROGRESS_READS)

    async def refresh(key: tuple[str, str, str], entry: dict[str, Any]) -> None:
        async with reads:
            await _in_thread(refresh_progress, key, entry)

    while True:
        await asyncio.sleep(settings.progress_interval_seconds)
        if "posting" in STATE and not _has_posting_context():
            event_loop, queue = STATE["posting"]
            posting.event_queue_loop_var.set(event_loop)
            posting.event_queue_var.set(queue)
        resync_due = time.monotonic() - last_resync >= RESYNC_SECONDS
        if resync_due:
            last_resync = time.monotonic()
        refreshes = []
        for key, entry in list(_INDEX.items()):
            # A fixed PodsNotStarting cause (phase Pending) sends no Job event, so the resync
            # finds it. Running resources with late pods are reconciled to find the cause.
            if resync_due and (entry["phase"] in ("Waiting", "Pending", None) or (
                entry["phase"] == "Running" and _pods_late(key[0], entry)
            )):
                item_logger = resource_logger(entry["kind"], key[0], key[2])
                _keep(asyncio.create_task(reconcile_key(*key, item_logger)))
            if entry["kind"] in TRAINING_KINDS and entry["phase"] == "Running" and entry["running"]:
                refreshes.append(refresh(key, entry))
        results = await asyncio.gather(*refreshes, return_exceptions=True)
        for error in (result for result in results if isinstance(result, Exception)):
            logger.warning("Reading training progress failed: %s; trying again in %.0f s.",
                           error, settings.progress_interval_seconds)


def refresh_progress(key: tuple[str, str, str], entry: dict[str, Any]) -> None:
    """Copy the latest training progress from the artifact store into status and metrics."""
    namespace, plural, name = key
    settings: OperatorSettings = STATE["settings"]
    # A run started by an earlier release recorded no outputUri and writes to the resource's
    # folder.
    uri = (entry.get("output") or entry["storage"]
           or reconciler().store.output_uri(namespace, entry["kind"], name))
    mounts = _mounts(settings)
    if progress.readable(uri, mounts):
        record = progress.read_latest(uri, mounts=mounts)
    else:
        # A claim the operator does not mount, or a file:// root that exists only in the
        # training pods: rank 0's metrics port has the progress instead.
        record = _read_rank_zero(namespace, name, entry)
    if not record:
        return
    current = _INDEX.get(key) or {}
    if current.get("phase") != "Running" or current.get("job") != entry.get("job"):
        return  # the run ended, or another began, while the record was read
    values = progress.to_status(record)
    metrics.set_progress(namespace, entry["kind"], name, values)
    if not _changes_progress(values, entry.get("progress") or {}):
        return
    try:
        stored = reconciler().api.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": {"progress": values}}
        )
    except ApiException as error:
        if error.status == 404:
            _forget_gone(namespace, plural, name)
            return
        raise
    # The progress write changes nothing a reconcile reads, so its event is skipped too.
    if stored["metadata"].get("generation") == entry["generation"]:
        _WRITTEN[entry["uid"]] = stored["metadata"]["resourceVersion"]
    _remember(stored)


# Jobs whose rank 0 did not respond on its metrics port, warned about once.
_UNREACHABLE_JOBS: set[tuple[str, str]] = set()


def _connection_refused(error: Exception) -> bool:
    """Return whether a failed HTTP read was a refused connection: nothing listens yet."""
    reason = getattr(error, "reason", error)  # urllib wraps socket errors in URLError
    return isinstance(reason, ConnectionRefusedError)


def _changes_progress(values: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Return whether a merge patch of `values` changes the stored status.progress.

    A field that `values` leaves out keeps its stored value, such as the message of an earlier
    skipped step. updatedAt is left out of the comparison, because a read of rank 0's gauges
    sets it to the time of the read, and an unchanged step should write no status.
    """
    return any(stored.get(key) != value for key, value in values.items() if key != "updatedAt")


def _read_rank_zero(namespace: str, name: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """Return the progress that rank 0 of a PretrainJob's running Job serves on its metrics
    port, or None when there is no such pod or it does not respond yet."""
    if entry["kind"] != "PretrainJob" or not entry.get("job"):
        return None
    selector = (f"batch.kubernetes.io/job-name={entry['job']},"
                "batch.kubernetes.io/job-completion-index=0")
    pods = reconciler().api.core.list_namespaced_pod(namespace, label_selector=selector).items
    address = next((pod.status.pod_ip for pod in pods
                    if pod.status and pod.status.phase == "Running" and pod.status.pod_ip), None)
    if address is None:
        return None
    try:
        return progress.read_pod_metrics(address, builders_training.TRAINER_METRICS_PORT)
    except (OSError, ValueError) as error:
        # NB: rank 0 refuses the connection until its exporter starts, after it has loaded
        # the data and built the model, so a refusal is expected and not logged. A timeout is
        # what a NetworkPolicy that drops the operator's packets gives. The next pass tries
        # again, and the warning goes out once per Job, not on every pass.
        if _connection_refused(error):
            return None
        if (namespace, entry["job"]) not in _UNREACHABLE_JOBS:
            _UNREACHABLE_JOBS.add((namespace, entry["job"]))
            resource_logger(entry["kind"], namespace, name).warning(
                "Reading the training metrics of Job %s at %s:%d failed: %s. Live progress "
                "shows once the port responds; a NetworkPolicy must let the operator reach it.",
                entry["job"], address, builders_training.TRAINER_METRICS_PORT, error)
        return None


def _mounts(settings: OperatorSettings) -> dict[str, str]:
    """Claims the operator pod mounts, as {claim: mount path}, from LATHE_MOUNTS."""
    pairs = [item.split("=", 1) for item in os.environ.get("LATHE_MOUNTS", "").split(",") if item]
    return {claim: path for claim, path in pairs}


def _record_phase(body: dict, phase: str | None, stored: dict | None = None) -> None:
    """Set the phase series of a reconciled resource and index its `stored` status write,
    unless its DELETED event was handled after the reconcile read it, which drops its
    _INDEX entry."""
    meta = body["metadata"]
    with _INDEX_LOCK:
        entry = _INDEX.get(_key(body))
        if entry is None or entry["uid"] != meta["uid"]:
            return
        if stored is not None:
            _remember(stored)
        metrics.PHASES.set(body["kind"], meta["namespace"], meta["name"], phase)


def _forget_gone(namespace: str, plural: str, name: str) -> None:
    """Drop what the operator keeps about a resource that the API server no longer has.

    Its DELETED event does the same, but a watch restart can miss that event, and a reconcile
    that ran during the deletion can have set the series again.
    """
    kind = next(model.kind_name for model in KINDS.values() if model.plural == plural)
    with _INDEX_LOCK:
        entry = _INDEX.pop((namespace, plural, name), None)
        metrics.forget(namespace, kind, name)
        metrics.PHASES.set(kind, namespace, name, None)
    if entry:
        _FAILURES.pop(entry["uid"], None)
        _forget_unreachable(namespace, entry.get("job"))


def forget_resource(body, logger) -> None:
    """Deletion cleanup: drop the resource's metric series. Owned objects go with the owner.

    NB: this runs from the DELETED event rather than an on.delete handler, because a change
    handler would make kopf keep a copy of the whole spec in the object as its diff base.
    """
    meta = body["metadata"]
    metrics.forget(meta.get("namespace", ""), body["kind"], meta["name"])
    metrics.PHASES.set(body["kind"], meta.get("namespace", ""), meta["name"], None)
    _forget_unreachable(meta.get("namespace", ""), (body.get("status") or {}).get("jobName"))
    logger.info("Removed the metric series of the deleted %s; Kubernetes garbage collection "
                "removes the objects it owned.", body["kind"])


def register() -> None:
    for model in KINDS.values():
        kopf.on.event(GROUP, VERSION, model.plural)(on_resource_event)
    kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY)(on_job_event)
    triton = {**MANAGED_BY, "app.kubernetes.io/component": "triton"}
    kopf.on.event("apps", "v1", "deployments", labels=triton)(on_serving_event)
    kopf.on.event("", "v1", "services", labels=triton)(on_serving_event)
    kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers",
                  labels=triton)(on_serving_event)


register()
