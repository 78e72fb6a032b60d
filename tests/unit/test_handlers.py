"""The handlers' retry backoff and the message of a rejected request, without a cluster."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from lathe.k8s import handlers


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (50, 300.0)],
)
def test_retry_delay_doubles_up_to_the_cap(failures, seconds):
    assert handlers.retry_delay(failures) == seconds


def api_error(status: int, message: str | None) -> ApiException:
    error = ApiException(status=status, reason="Forbidden")
    error.body = json.dumps({"kind": "Status", "message": message}) if message else "not json"
    return error


def test_api_message_prefers_the_servers_text():
    text = 'jobs.batch "x" is forbidden: exceeded quota: no-jobs'
    assert handlers._api_message(api_error(403, text)) == text
    assert handlers._api_message(api_error(403, None)) == "Forbidden"
