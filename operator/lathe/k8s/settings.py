"""Operator settings, read once from the environment at startup (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lathe import __version__
from lathe.k8s.leader import LeaderElectionSettings


@dataclass(frozen=True)
class OperatorSettings:
    artifact_root: str
    data_root: str
    trainer_image: str
    sync_image: str
    # The Triton server of ModelDeployments that set no spec.serving.image.
    triton_image: str
    metrics_port: int
    metrics_host: str
    progress_interval_seconds: float
    queue_name: str | None
    # A Secret in each resource's namespace whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    # AWS_ENDPOINT_URL, ...) become the environment of pods that read or write s3:// URIs.
    s3_secret: str | None = None
    # None runs the operator without leader election, as one pod must then.
    leader_election: LeaderElectionSettings | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if env is None else env)
        artifact_root = env.get("LATHE_ARTIFACT_ROOT", "pvc://lathe-artifacts/lathe")
        return cls(
            artifact_root=artifact_root,
            data_root=env.get("LATHE_DATA_ROOT", artifact_root.rstrip("/") + "/data"),
            trainer_image=env.get("LATHE_TRAINER_IMAGE", f"ghcr.io/lathe-dev/trainer:{__version__}"),
            sync_image=env.get("LATHE_SYNC_IMAGE", f"ghcr.io/lathe-dev/trainer:{__version__}"),
            triton_image=env.get("LATHE_TRITON_IMAGE",
                                 f"ghcr.io/lathe-dev/triton:{__version__}"),
            metrics_port=int(env.get("LATHE_METRICS_PORT", "8080")),
            metrics_host=env.get("LATHE_METRICS_HOST", "0.0.0.0"),
            progress_interval_seconds=float(env.get("LATHE_PROGRESS_INTERVAL", "15")),
            queue_name=env.get("LATHE_QUEUE_NAME") or None,
            s3_secret=env.get("LATHE_S3_SECRET") or None,
            leader_election=LeaderElectionSettings.from_env(env),
        )
