"""The leader elector's handling of failed Lease requests, without an API server.

The election against a real API server runs in tests/cluster/test_leader_election.py.
"""

from __future__ import annotations

import logging

import kubernetes
import pytest

from lathe.k8s.leader import LeaderElectionSettings, LeaderElector

SETTINGS = LeaderElectionSettings(lease_name="lathe-leader", namespace="ops", identity="pod-a",
                                  lease_duration=6, renew_deadline=4, retry_period=1)


class ForbiddingApi:
    """A CoordinationV1Api whose every call is rejected, as without RBAC for Leases."""

    def __init__(self) -> None:
        self.calls = 0

    def _reject(self, *args, **kwargs):
        self.calls += 1
        raise kubernetes.client.ApiException(status=403, reason="Forbidden")

    read_namespaced_lease = create_namespaced_lease = replace_namespaced_lease = _reject


@pytest.fixture
def elector(caplog):
    caplog.set_level(logging.INFO)
    built = LeaderElector(SETTINGS, logging.getLogger("test.leader"), exit_process=pytest.fail)
    built._api.api = ForbiddingApi()
    return built


def test_forbidden_lease_logged(elector, caplog):
    assert elector._election.try_acquire_or_renew() is False
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "HTTP 403" in warnings[0]
    assert "may not get, create or update Leases in namespace ops" in warnings[0]


def test_repeated_failure_logged_once(elector, caplog):
    for _ in range(5):
        elector._election.try_acquire_or_renew()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert elector._api.api.calls == 5
    assert len(warnings) == 1


def test_requests_carry_timeout():
    seen = {}

    class RecordingApi:
        def read_namespaced_lease(self, *args, **kwargs):
            seen.update(kwargs)
            raise kubernetes.client.ApiException(status=404, reason="Not Found")

        def create_namespaced_lease(self, *args, **kwargs):
            seen.update(kwargs)
            raise kubernetes.client.ApiException(status=409, reason="Conflict")

    built = LeaderElector(SETTINGS, logging.getLogger("test.leader"), exit_process=pytest.fail)
    built._api.api = RecordingApi()
    assert built._election.try_acquire_or_renew() is False
    assert seen["_request_timeout"] == SETTINGS.renew_deadline / 2


def test_longer_recorded_duration_honoured(elector):
    """Another holder's leaseDurationSeconds longer than this pod's own is waited out."""
    from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

    election = elector._election
    election.observed_record = LeaderElectionRecord("pod-old", "60", "t0", "t0")
    assert election._recorded_duration() == 60
    election.observed_record = LeaderElectionRecord("pod-a", "60", "t0", "t0")
    assert election._recorded_duration() == 0


def test_lease_requests_name_operator():
    """The Lease's creates and renewals carry the operator's User-Agent, which the API server
    records as their field manager, not the client's default OpenAPI-Generator."""
    built = LeaderElector(SETTINGS, logging.getLogger("test.leader"), exit_process=pytest.fail)
    assert built._lock.api_instance is built._api
    assert built._api.api.api_client.user_agent.startswith("lathe-operator/")
