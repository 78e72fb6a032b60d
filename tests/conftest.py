"""Fixtures shared by every suite."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lathe.api import KINDS
from lathe.plans import stage_config
from lathe_trainer.stage import ResolvedInput, StageConfig

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real data: $LATHE_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("LATHE_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "pubmed").is_dir():
        pytest.fail(f"The real data is missing at {path}; set LATHE_DATA_DIR to its location.")
    return path


@pytest.fixture
def make_config(tmp_path, data_dir):
    """Build a StageConfig for a resource dict, as the plan would, with output under tmp_path."""

    def factory(
        resource: dict, inputs: dict[str, ResolvedInput] | None = None, output: Path | None = None
    ) -> StageConfig:
        resource.setdefault("metadata", {"name": "test"})
        model = KINDS[resource["kind"]].model_validate(resource)
        output = output or tmp_path / "out"
        output.mkdir(parents=True, exist_ok=True)
        return stage_config(model, inputs or {}, f"file://{output}", str(data_dir))

    return factory


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real S3 store (SeaweedFS on loopback) with the bucket `lathe`.

    The AWS_* variables that point clients at it stay set for the whole session, so that stage
    subprocesses find the store too.
    """
    from s3_store import BUILD_SCRIPT, S3Store, build

    try:
        binary = build()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"SeaweedFS, the S3 store of the s3:// tests, could not be built: {error}\n"
                    f"Build it with {BUILD_SCRIPT}; it needs Go 1.26 and the Go module proxy.")
    store = S3Store(binary, tmp_path_factory.mktemp("s3-store"))
    store.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in store.env.items():
                patch.setenv(key, value)
            yield store
    finally:
        store.stop()
