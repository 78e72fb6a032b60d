"""Typed errors. The operator maps them onto kopf's permanent and temporary errors.

Every message is a sentence that names the resource, the field, the bad value and the fix.
"""

from __future__ import annotations


class LatheError(Exception):
    """Base of Lathe's own errors."""


class InvalidResourceError(LatheError):
    """A resource that can never succeed as written: retrying will not help."""

    def __init__(self, resource: str, field: str, message: str):
        super().__init__(f"{resource}: {field}: {message}")
        self.resource = resource
        self.field = field
        self.detail = message


class InputsNotReadyError(LatheError):
    """A referenced input does not exist yet or has not finished: retry later."""

    def __init__(self, resource: str, field: str, missing: str):
        super().__init__(f"{resource}: {field}: waiting for {missing}.")
        self.resource = resource
        self.field = field
        self.missing = missing


class StageFailedError(LatheError):
    """A stage workload exited with an error."""

    def __init__(self, resource: str, exit_code: int, message: str):
        super().__init__(f"{resource}: the stage failed with exit code {exit_code}: {message}")
        self.resource = resource
        self.exit_code = exit_code
        self.detail = message


class WorkspaceError(LatheError):
    """The workspace cannot be used: in use by another run, or not writable."""
