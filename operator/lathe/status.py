"""Conditions and phases, shared by the operator and the local runner.

Conditions follow the Kubernetes API conventions. The phase is derived from the conditions, never
stored on its own, so the two cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


class ConditionType:
    INPUTS_READY = "InputsReady"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    READY = "Ready"
    EXPORTED = "Exported"


class Reason:
    INPUTS_AVAILABLE = "InputsAvailable"
    INPUT_NOT_FOUND = "InputNotFound"
    INPUT_NOT_READY = "InputNotReady"
    INVALID_SPEC = "InvalidSpec"
    JOB_CREATED = "JobCreated"
    ATTEMPT_RESTARTED = "AttemptRestarted"
    JOB_RUNNING = "JobRunning"
    PODS_NOT_STARTING = "PodsNotStarting"
    JOB_SUCCEEDED = "JobSucceeded"
    JOB_FAILED = "JobFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    REUSED = "ReusedArtifact"
    INTERRUPTED = "Interrupted"
    SUSPENDED = "SuspendedBySpec"
    RESUMED = "Resumed"
    EXPORTING = "Exporting"
    SERVER_READY = "ServerReady"
    SERVER_NOT_READY = "ServerNotReady"
    SCALED_TO_ZERO = "ScaledToZero"
    RECONCILE_FAILED = "ReconcileFailed"


class Phase:
    PENDING = "Pending"
    WAITING = "Waiting"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    READY = "Ready"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return conditions with one condition set.

    `lastTransitionTime` changes only when the status value changes, per the API conventions.
    """
    value = status if isinstance(status, str) else ("True" if status else "False")
    previous = next((c for c in conditions if c["type"] == type_), None)
    transition = previous["lastTransitionTime"] if previous and previous["status"] == value else now()
    condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }
    others = [c for c in conditions if c["type"] != type_]
    return sorted(others + [condition], key=lambda c: c["type"])


def condition_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


def derive_phase(conditions: list[dict[str, Any]], summary: str = ConditionType.SUCCEEDED) -> str:
    """Summarize conditions into one phase for printer columns."""
    if condition_true(conditions, ConditionType.FAILED):
        return Phase.FAILED
    if condition_true(conditions, summary):
        return Phase.READY if summary == ConditionType.READY else Phase.SUCCEEDED
    if condition_true(conditions, ConditionType.SUSPENDED):
        return Phase.SUSPENDED
    # A run that started before an input ran again or was deleted goes on with the inputs it
    # read, so it is Running while InputsReady is False.
    if condition_true(conditions, ConditionType.RUNNING):
        return Phase.RUNNING
    if any(
        c["type"] == ConditionType.INPUTS_READY and c["status"] == "False" for c in conditions
    ):
        return Phase.WAITING
    return Phase.PENDING
