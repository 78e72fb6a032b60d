"""The operator's leader election settings as the Helm chart passes them in the environment.

The election itself runs against the real API server in tests/cluster/test_leader_election.py.
"""

from __future__ import annotations

import pytest

from lathe.k8s.leader import LeaderElectionSettings
from lathe.k8s.settings import OperatorSettings

CHART_ENV = {
    "LATHE_LEADER_ELECTION": "true",
    "LATHE_LEADER_ELECTION_NAMESPACE": "lathe-system",
    "LATHE_LEADER_ELECTION_ID": "lathe-leader",
    "LATHE_POD_NAME": "lathe-7d9f-abcde",
    "LATHE_LIVENESS_ENDPOINT": "http://0.0.0.0:8081/healthz",
}


def test_election_off_by_default():
    assert OperatorSettings.from_env({}).leader_election is None


def test_election_off_when_false():
    assert LeaderElectionSettings.from_env({**CHART_ENV, "LATHE_LEADER_ELECTION": "false"}) is None


def test_chart_environment_read():
    settings = OperatorSettings.from_env(CHART_ENV).leader_election
    assert settings == LeaderElectionSettings(
        lease_name="lathe-leader", namespace="lathe-system", identity="lathe-7d9f-abcde",
        lease_duration=15, renew_deadline=10, retry_period=2,
        liveness_endpoint="http://0.0.0.0:8081/healthz",
    )


def test_identity_unique_without_pod_name():
    env = {key: value for key, value in CHART_ENV.items() if key != "LATHE_POD_NAME"}
    first = LeaderElectionSettings.from_env(env)
    second = LeaderElectionSettings.from_env(env)
    assert first.identity != second.identity


def test_missing_namespace_rejected(monkeypatch, tmp_path):
    monkeypatch.setattr("lathe.k8s.leader.SERVICE_ACCOUNT_NAMESPACE", str(tmp_path / "none"))
    env = {key: value for key, value in CHART_ENV.items()
           if key != "LATHE_LEADER_ELECTION_NAMESPACE"}
    with pytest.raises(ValueError, match="set LATHE_LEADER_ELECTION_NAMESPACE"):
        LeaderElectionSettings.from_env(env)


def test_namespace_read_from_service_account(monkeypatch, tmp_path):
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("ops\n")
    monkeypatch.setattr("lathe.k8s.leader.SERVICE_ACCOUNT_NAMESPACE", str(namespace_file))
    env = {key: value for key, value in CHART_ENV.items()
           if key != "LATHE_LEADER_ELECTION_NAMESPACE"}
    assert LeaderElectionSettings.from_env(env).namespace == "ops"


@pytest.mark.parametrize("timings", [
    {"LATHE_LEASE_DURATION": "10", "LATHE_RENEW_DEADLINE": "10"},
    {"LATHE_RENEW_DEADLINE": "2", "LATHE_RETRY_PERIOD": "2"},
    {"LATHE_RETRY_PERIOD": "0"},
    {"LATHE_LEASE_DURATION": "11", "LATHE_RENEW_DEADLINE": "10", "LATHE_RETRY_PERIOD": "2"},
])
def test_invalid_timing_rejected(timings):
    with pytest.raises(ValueError, match="Invalid leader election timing"):
        LeaderElectionSettings.from_env({**CHART_ENV, **timings})


def test_non_integer_seconds_rejected():
    with pytest.raises(ValueError, match=r"LATHE_LEASE_DURATION='15s' is not a whole number"):
        LeaderElectionSettings.from_env({**CHART_ENV, "LATHE_LEASE_DURATION": "15s"})
