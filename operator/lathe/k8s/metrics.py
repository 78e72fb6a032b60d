"""Prometheus metrics of the operator, served on its /metrics endpoint.

Names follow the Prometheus conventions: a `lathe_` prefix, base units, `_total` for counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "lathe_reconciles_total",
    "Reconciles of Lathe resources, by kind and result (success, waiting, error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "lathe_reconcile_duration_seconds",
    "Time spent in one reconcile, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RESOURCES = Gauge(
    "lathe_resources",
    "Lathe resources by kind and phase (derived from the summary condition).",
    ["kind", "phase"],
    registry=REGISTRY,
)
RESOURCE_PHASE = Gauge(
    "lathe_resource_phase",
    "1 for each Lathe resource, labelled with its current phase, as kube-state-metrics labels "
    "a pod's phase.",
    ["namespace", "kind", "name", "phase"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "lathe_operator_leader",
    "1 while this operator pod holds the leader election Lease (or runs without leader "
    "election), 0 while it waits as a follower.",
    registry=REGISTRY,
)
TRAINING_STEP = Gauge(
    "lathe_training_step", "Optimizer steps completed.", ["namespace", "kind", "name"],
    registry=REGISTRY,
)
TRAINING_LOSS = Gauge(
    "lathe_training_loss", "Most recent training loss.", ["namespace", "kind", "name"],
    registry=REGISTRY,
)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "lathe_training_tokens_per_second", "Training throughput over all processes.",
    ["namespace", "kind", "name"], registry=REGISTRY,
)
TRAINING_ETA = Gauge(
    "lathe_training_eta_seconds", "Estimated seconds until training finishes.",
    ["namespace", "kind", "name"], registry=REGISTRY,
)
# The same name as the trainer's own exporter (lathe_trainer.training.metrics), so the dashboard's
# MFU panel reads one series whichever of the two Prometheus scrapes.
TRAINING_MFU = Gauge(
    "lathe_training_mfu_ratio", "Model FLOPs utilization of the latest step, 0 to 1.",
    ["namespace", "kind", "name"], registry=REGISTRY,
)
TRAINING_GAUGES = (TRAINING_STEP, TRAINING_LOSS, TRAINING_TOKENS_PER_SECOND, TRAINING_ETA,
                   TRAINING_MFU)


def set_progress(namespace: str, kind: str, name: str, progress: dict) -> None:
    values = {
        TRAINING_STEP: progress.get("step"),
        TRAINING_LOSS: progress.get("loss"),
        TRAINING_TOKENS_PER_SECOND: progress.get("tokensPerSecond"),
        TRAINING_ETA: progress.get("etaSeconds"),
        TRAINING_MFU: progress.get("mfu"),
    }
    for gauge, value in values.items():
        if value is not None:
            gauge.labels(namespace, kind, name).set(value)


def forget(namespace: str, kind: str, name: str) -> None:
    """Drop a deleted resource's series, so dashboards do not show it as stalled."""
    for gauge in TRAINING_GAUGES:
        try:
            gauge.remove(namespace, kind, name)
        except KeyError:
            pass


class PhaseCounts:
    """Tracks each resource's phase so `lathe_resources` counts current phases only.

    Counts change by one per update, so a reconcile costs the same with 10 or 10,000 resources.
    """

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str, str], str] = {}

    def set(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        key = (kind, namespace, name)
        previous = self.phases.get(key)
        if previous == phase:
            return
        if previous is not None:
            RESOURCES.labels(kind, previous).dec()
            RESOURCE_PHASE.remove(namespace, kind, name, previous)
        if phase is None:
            self.phases.pop(key, None)
        else:
            self.phases[key] = phase
            RESOURCES.labels(kind, phase).inc()
            RESOURCE_PHASE.labels(namespace, kind, name, phase).set(1)


PHASES = PhaseCounts()
