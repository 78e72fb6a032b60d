"""Typed errors. The operator maps them onto kopf's permanent and temporary errors.

Every message is a sentence that names the resource, the field, the bad value and the fix.
"""

from __future__ import annotations


class LatheError(Exception):
    """Base of Lathe's own errors."""


class InvalidResourceError(LatheError):
    """A resource that can never succeed as written: retrying will not help."""

    def __init__(self, resource: str, field: str, message: str):
        # An empty field means the whole file, such as YAML that does not parse.
        super().__init__(f"{resource}: {field}: {message}" if field else f"{resource}: {message}")
        self.resource = resource
        self.field = field
        self.detail = message


class InvalidResourcesError(InvalidResourceError):
    """Several invalid resources or files, reported together so that one run lists them all.

    The message lists each error on its own line. The resource, field and detail attributes are
    those of the first error, for callers that handle a single InvalidResourceError.
    """

    def __init__(self, errors: list[InvalidResourceError]):
        # A resource with several invalid fields raises one of these too, and each of its
        # errors is listed on its own line.
        errors = [item for error in errors
                  for item in (error.errors if isinstance(error, InvalidResourcesError)
                               else [error])]
        first = errors[0]
        super().__init__(first.resource, first.field, first.detail)
        lines = "".join(f"\n  {error}" for error in errors)
        self.args = (f"{len(errors)} errors in the resource files; fix each of them:{lines}",)
        self.errors = list(errors)


def raise_errors(errors: list[InvalidResourceError]) -> None:
    """Raise a single error as it is, and several as one InvalidResourcesError."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InvalidResourcesError(errors)


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


class ObjectStoreError(LatheError):
    """A request to an object store (s3://) failed: the store is unreachable, or it rejected
    the credentials or the request."""

    def __init__(self, resource: str, field: str, error: Exception):
        # obstore appends its Rust debug output, dozens of lines, after the first line.
        lines = str(error).strip().splitlines()
        reason = lines[0].strip() if lines else type(error).__name__
        where = "".join(f"{part}: " for part in (resource, field) if part)
        super().__init__(
            f"{where}the object store request failed: {reason}; check the store's address "
            "(AWS_ENDPOINT_URL), region (AWS_REGION) and credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY), then run again."
        )
        self.resource = resource
        self.field = field


class WorkspaceError(LatheError):
    """The workspace cannot be used: in use by another run, or not writable."""
