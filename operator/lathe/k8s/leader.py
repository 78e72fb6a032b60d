"""Leader election on a coordination.k8s.io Lease, so that several operator pods can run and
only one of them reconciles.

The election itself is the kubernetes client's `leaderelection` package (the client-go
algorithm: a follower takes the Lease once its holder has not renewed it for the lease
duration, and a leader that cannot renew it within the renew deadline stops). This module adds
what an operator needs around it. kopf waits in a startup handler until this pod leads, and a
pod that waits still serves its liveness probe. A leader that loses the Lease, or whose
renewals get no response, exits at once. A leader that shuts down releases the Lease, so that a
waiting pod takes over within a retry period instead of a lease duration.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Callable

import kubernetes
import urllib3
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from lathe.k8s import metrics

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Seconds between repeats of the same Lease error in the log.
REPORT_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class LeaderElectionSettings:
    """The Lease's name and namespace, this pod's identity, and the election timing in seconds."""

    lease_name: str
    namespace: str
    identity: str
    lease_duration: int = 15
    renew_deadline: int = 10
    retry_period: int = 2
    # kopf's --liveness URL. A waiting pod serves it itself, because kopf serves it only once
    # its startup handlers have finished.
    liveness_endpoint: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> LeaderElectionSettings | None:
        """Read LATHE_LEADER_ELECTION and its companions; None when the election is off."""
        if env.get("LATHE_LEADER_ELECTION", "false").lower() not in ("true", "1", "yes"):
            return None
        namespace = env.get("LATHE_LEADER_ELECTION_NAMESPACE") or _own_namespace()
        if not namespace:
            raise ValueError(
                "LATHE_LEADER_ELECTION is true but the Lease's namespace is unknown: set "
                "LATHE_LEADER_ELECTION_NAMESPACE (the Helm chart sets it to the release namespace)."
            )
        settings = cls(
            lease_name=env.get("LATHE_LEADER_ELECTION_ID", "lathe-operator"),
            namespace=namespace,
            # client-go's default identity is the host name and a UUID, unique per process.
            identity=env.get("LATHE_POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4()}",
            lease_duration=_seconds(env, "LATHE_LEASE_DURATION", 15),
            renew_deadline=_seconds(env, "LATHE_RENEW_DEADLINE", 10),
            retry_period=_seconds(env, "LATHE_RETRY_PERIOD", 2),
            liveness_endpoint=env.get("LATHE_LIVENESS_ENDPOINT") or None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        # The same rules as electionconfig.Config, which calls sys.exit() instead of raising.
        # A leader stops within the renew deadline and one retry period of its last renewal
        # (see LeaderElector._watch), which must come before a follower may take the Lease.
        valid = (self.retry_period >= 1
                 and self.renew_deadline > 1.2 * self.retry_period
                 and self.lease_duration >= self.renew_deadline + self.retry_period)
        if not valid:
            raise ValueError(
                f"Invalid leader election timing: LATHE_LEASE_DURATION={self.lease_duration}, "
                f"LATHE_RENEW_DEADLINE={self.renew_deadline}, "
                f"LATHE_RETRY_PERIOD={self.retry_period}. The lease duration must be at least "
                "the renew deadline plus the retry period, and the renew deadline must exceed "
                "1.2 times the retry period (at least 1 s); the defaults are 15, 10 and 2."
            )


def _seconds(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number of seconds; "
                         f"set it to an integer such as {default}.") from None


def _own_namespace() -> str | None:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as file:
            return file.read().strip() or None
    except OSError:
        return None


class _TimedApi:
    """CoordinationV1Api calls with a request timeout, remembering the last API error.

    NB: the kubernetes client sets no timeout by default, and the client's election checks the
    renew deadline only between tries, so one request that never returns would keep a leader
    leading without a Lease.
    """

    def __init__(self, api: kubernetes.client.CoordinationV1Api, timeout: float) -> None:
        self.api = api
        self.timeout = timeout
        self.last_error: kubernetes.client.ApiException | None = None

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.api, method)(*args, _request_timeout=self.timeout, **kwargs)
        except kubernetes.client.ApiException as error:
            self.last_error = error
            raise

    def read_namespaced_lease(self, *args, **kwargs):
        return self._call("read_namespaced_lease", *args, **kwargs)

    def create_namespaced_lease(self, *args, **kwargs):
        return self._call("create_namespaced_lease", *args, **kwargs)

    def replace_namespaced_lease(self, *args, **kwargs):
        return self._call("replace_namespaced_lease", *args, **kwargs)


class _Election(leaderelection.LeaderElection):
    """The client's election with a stop switch, and API failures counted as failed tries.

    NB: upstream lets an exception other than ApiException (a refused connection, a timeout)
    end the thread that renews the Lease, and then nothing stops a leader that no longer
    renews. Here such a failure is one failed try, so the renew deadline still applies.
    """

    def __init__(self, config: electionconfig.Config, stopped: threading.Event,
                 on_failed_try: Callable[[Exception | None, str | None], None]) -> None:
        super().__init__(config)
        self.stopped = stopped
        self.on_failed_try = on_failed_try
        self.leading_failed: threading.Event | None = None
        self.lease_duration = config.lease_duration
        # time.monotonic() of the last successful take or renewal of the Lease.
        self.last_renewed = 0.0

    def acquire(self) -> bool:
        while not self.stopped.is_set():
            if self.try_acquire_or_renew():
                return True
            self.stopped.wait(self.election_config.retry_period)
        return False

    def run_onstarted_leading(self, leading_failed: threading.Event) -> None:
        # The renew loop returns once this event is set, which is how release() ends leading.
        self.leading_failed = leading_failed
        if self.stopped.is_set():
            leading_failed.set()
        super().run_onstarted_leading(leading_failed)

    def try_acquire_or_renew(self) -> bool:
        # NB: the client compares another holder's last renewal with this pod's own lease
        # duration. The Lease's leaseDurationSeconds is how long its holder asked candidates to
        # wait, so a longer one, from a pod that runs other settings, is honoured.
        self.election_config.lease_duration = max(self.lease_duration, self._recorded_duration())
        try:
            succeeded = super().try_acquire_or_renew()
        except Exception as error:  # noqa: BLE001 (any failure is a failed try; see above)
            self.on_failed_try(error, None)
            return False
        finally:
            self.election_config.lease_duration = self.lease_duration
        if succeeded:
            self.last_renewed = time.monotonic()
        else:
            holder = self.observed_record.holder_identity if self.observed_record else None
            self.on_failed_try(None, holder)
        return succeeded

    def _recorded_duration(self) -> int:
        record = self.observed_record
        if record is None or record.holder_identity == self.election_config.lock.identity:
            return 0
        try:
            return int(record.lease_duration)
        except (TypeError, ValueError):
            return 0


class LeaderElector:
    """An election run in a thread, with an event that is set once this pod leads."""

    def __init__(self, settings: LeaderElectionSettings, logger: logging.Logger,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.settings = settings
        self.logger = logger
        self.exit_process = exit_process
        self.leading = threading.Event()
        self.stopped = threading.Event()
        self._holder: str | None = None
        self._lock = LeaseLock(settings.lease_name, settings.namespace, settings.identity)
        # The Lease's writes name the operator in managedFields and audit logs, as its other
        # requests do. Half the renew deadline leaves room for a second try before it passes.
        # NB: imported here, because lathe.k8s.reconcile imports this module's settings.
        from lathe.k8s.reconcile import operator_api_client

        api = kubernetes.client.CoordinationV1Api(operator_api_client())
        self._api = _TimedApi(api, timeout=settings.renew_deadline / 2)
        self._lock.api_instance = self._api
        self._reported: tuple[int | None, str] | None = None
        self._reported_at = 0.0
        config = electionconfig.Config(
            self._lock, settings.lease_duration, settings.renew_deadline,
            settings.retry_period, self._started_leading, self._stopped_leading,
        )
        self._election = _Election(config, self.stopped, self._failed_try)
        self._thread = threading.Thread(target=self._election.run, name="leader-election",
                                        daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="leader-watchdog",
                                          daemon=True)
        # The client logs every try at INFO (every retry period); this class logs the changes.
        logging.getLogger("leaderelection").setLevel(logging.WARNING)

    @property
    def lease(self) -> str:
        return f"{self.settings.namespace}/{self.settings.lease_name}"

    async def wait_until_leading(self) -> None:
        """Start the election and return once this pod holds the Lease, serving the liveness
        probe in the meantime."""
        metrics.LEADER.set(0)
        self.logger.info("Pod %s is joining the leader election on Lease %s.",
                         self.settings.identity, self.lease)
        self._thread.start()
        probe = _StandbyProbe.start(self.settings.liveness_endpoint, self.describe)
        try:
            while not self.leading.is_set():
                await asyncio.sleep(0.2)
        finally:
            if probe is not None:
                # kopf binds the same port for its own probe once this handler returns.
                await asyncio.to_thread(probe.stop)

    def describe(self) -> dict:
        return {"leader": self.leading.is_set(), "identity": self.settings.identity,
                "holder": self._holder, "lease": self.lease}

    def release(self) -> None:
        """Stop renewing and, if this pod still holds the Lease, hand it over at once."""
        self.stopped.set()
        if self._election.leading_failed is not None:
            self._election.leading_failed.set()
        self._thread.join(timeout=self.settings.retry_period + 5)
        if not self.leading.is_set():
            return
        self.leading.clear()
        metrics.LEADER.set(0)
        api = self._api
        try:
            lease = api.read_namespaced_lease(self.settings.lease_name, self.settings.namespace)
            if lease.spec.holder_identity != self.settings.identity:
                return
            # A Lease without a holder is free: the client's followers take it on their next
            # try. The resourceVersion in `lease` makes this a no-op if another pod took it.
            lease.spec.holder_identity = None
            api.replace_namespaced_lease(self.settings.lease_name, self.settings.namespace,
                                         lease)
        except (kubernetes.client.ApiException, OSError, urllib3.exceptions.HTTPError) as error:
            self.logger.warning(
                "Could not release Lease %s on shutdown (%s); another pod takes it over once "
                "it expires, after %d s.", self.lease, error, self.settings.lease_duration)
            return
        self.logger.info("Released Lease %s on shutdown.", self.lease)

    def _started_leading(self) -> None:
        self._holder = self.settings.identity
        metrics.LEADER.set(1)
        self.logger.info("Pod %s acquired Lease %s and starts reconciling as the leader.",
                         self.settings.identity, self.lease)
        self.leading.set()
        self._watchdog.start()

    def _watch(self) -> None:
        """Exit once the last renewal is older than the renew deadline, whatever the election
        thread is doing, such as waiting on a request that does not return."""
        tick = min(1.0, self.settings.retry_period / 2)
        while not self.stopped.wait(tick):
            since = time.monotonic() - self._election.last_renewed
            if self.leading.is_set() and since > self.settings.renew_deadline:
                self._lost(f"its last renewal was {since:.0f} s ago")
                return

    def _stopped_leading(self) -> None:
        metrics.LEADER.set(0)
        if self.stopped.is_set():
            return
        self._lost(f"it could not renew it within {self.settings.renew_deadline} s")

    def _lost(self, why: str) -> None:
        # NB: as in controller-runtime, a leader that lost the Lease exits at once: another
        # pod may already reconcile, and two operators acting on one resource race.
        self.logger.error(
            "Pod %s lost Lease %s: %s. Exiting so that the new leader alone reconciles; the "
            "pod restarts as a follower.", self.settings.identity, self.lease, why)
        logging.shutdown()
        self.exit_process(1)

    def _failed_try(self, error: Exception | None, holder: str | None) -> None:
        api_error, self._api.last_error = self._api.last_error, None
        if error is None and api_error is not None and api_error.status not in (404, 409):
            # The client catches these (403 without RBAC, 429 under load) and logs them only
            # at INFO, so a pod without access to the Lease would wait silently.
            error = api_error
        if error is not None:
            self._report(error)
            return
        if holder != self._holder and not self.leading.is_set():
            self.logger.info("Lease %s is held by %s; pod %s waits as a follower.",
                             self.lease, holder, self.settings.identity)
        self._holder = holder


    def _report(self, error: Exception) -> None:
        """Log a failed request to the Lease once per kind of failure, and every minute while
        it lasts."""
        kind = (getattr(error, "status", None), type(error).__name__)
        now = time.monotonic()
        if kind == self._reported and now - self._reported_at < REPORT_EVERY_SECONDS:
            return
        self._reported, self._reported_at = kind, now
        status = f"HTTP {kind[0]}: " if kind[0] else ""
        reason = getattr(error, "reason", None) or error
        self.logger.warning(
            "Could not read or update Lease %s (%s%s). Retrying every %d s; a 403 means the "
            "ServiceAccount may not get, create or update Leases in namespace %s.",
            self.lease, status, reason, self.settings.retry_period, self.settings.namespace)


class _StandbyProbe(http.server.ThreadingHTTPServer):
    """An HTTP server that returns 200 on kopf's liveness path while the pod waits for the Lease."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], path: str,
                 describe: Callable[[], dict]) -> None:
        self.probe_path = path
        self.describe = describe
        super().__init__(address, _StandbyHandler)

    @classmethod
    def start(cls, endpoint: str | None,
              describe: Callable[[], dict]) -> _StandbyProbe | None:
        if not endpoint:
            return None
        url = urllib.parse.urlsplit(endpoint)
        probe = cls((url.hostname or "0.0.0.0", url.port or 80), url.path or "/",
                    describe)
        threading.Thread(target=probe.serve_forever, name="standby-probe", daemon=True).start()
        return probe

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _StandbyHandler(http.server.BaseHTTPRequestHandler):
    server: _StandbyProbe

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        if urllib.parse.urlsplit(self.path).path != self.server.probe_path:
            self.send_error(404)
            return
        body = json.dumps(self.server.describe()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the kubelet probes every few seconds; kopf's own probe does not log either
