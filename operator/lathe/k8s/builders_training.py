"""The stage Job of a workload plan, with its ConfigMap and headless Service.

Every bounded stage (corpus, tokenizer, pretrain, finetune, export) runs as one Indexed Job per
attempt, following the Kubeflow Trainer and JobSet conventions. A failed attempt is torn down as
a whole, and the operator creates the next attempt as a new Job with a new name and a new
rendezvous id, resuming from the latest checkpoint. The three objects of an attempt share one name,
`<resource>-<stage>-r<run>-<attempt>` (see `job_name`).
"""

from __future__ import annotations

import re

from lathe.errors import InvalidResourceError
from lathe.k8s import builders, launcher
from lathe.k8s.builders import ArtifactStore
from lathe.plans.base import CONFIG_PATH_PLACEHOLDER, WorkloadPlan
from lathe_trainer.stage import EXIT_PERMANENT

CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/lathe"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
# The c10d rendezvous port on node 0, always given in the endpoint: torch's c10d backend would
# default to 29400, and 29500 is the port PyTorch uses for the static rendezvous (MASTER_PORT).
RENDEZVOUS_PORT = 29500
# The port where rank 0 of a PretrainJob serves its training gauges for Prometheus
# (lathe_trainer.training.metrics.PrometheusExporter). The operator reads live progress there
# when it cannot read the run's progress file in the artifact store (lathe.k8s.progress).
TRAINER_METRICS_PORT = 9400
KUEUE_QUEUE_LABEL = builders.KUEUE_QUEUE_LABEL

# The Job controller names the pods' hosts `<job>-<index>`, which must fit in a DNS label, so job
# names leave room for the largest index: DistributedSpec.nodes allows 1024 nodes (index 1023).
JOB_NAME_LENGTH = builders.MAX_NAME_LENGTH - len("-1023")

# The API server rejects a ConfigMap whose data exceeds 1 MiB.
MAX_CONFIG_MAP_BYTES = 1024 * 1024

# Indexes of the podFailurePolicy rules whose FailJob action ends an attempt. The Job's Failed
# condition message names the index ("... matching FailJob rule at index 1"), so the operator
# can tell a permanent error from a retriable one even after the pods are gone.
RULE_PERMANENT = 1
RULE_RETRIABLE = 2

_CPU_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")


def job_name(plan: WorkloadPlan, attempt: int) -> str:
    """Return the name of an attempt's Job, ConfigMap and headless Service.

    The name carries the stage, so that a Corpus and a Tokenizer of the same name do not collide.
    It carries the run number too (WorkloadPlan.run), so a new run's Job never meets the
    previous run's Job while that one is being deleted. Callers that look up the Job must use
    this function.
    """
    suffix = f"{plan.stage}-r{plan.run}"
    return builders.object_name(plan.name, suffix, attempt, max_length=JOB_NAME_LENGTH)


def attempt_id(plan: WorkloadPlan, owner: dict, attempt: int) -> str:
    """Return an id unique to one attempt of one run of the resource."""
    return f"{builders.owner_reference(owner)['uid']}-r{plan.run}-{attempt}"


def namespace(plan: WorkloadPlan, owner: dict) -> str:
    """Return the plan's namespace, checked against the owner's when the owner names one."""
    owner_namespace = (owner.get("metadata") or {}).get("namespace")
    if owner_namespace and owner_namespace != plan.config.namespace:
        raise ValueError(
            f"The owner's namespace {owner_namespace!r} differs from the plan's namespace "
            f"{plan.config.namespace!r}; build the plan from the same resource as the owner."
        )
    return plan.config.namespace


def pod_labels(plan: WorkloadPlan, attempt: int) -> dict[str, str]:
    return builders.labels(plan.kind, plan.name, attempt, component=plan.stage)


def needs_headless_service(plan: WorkloadPlan) -> bool:
    """Return True when the attempt's pods must find node 0 by name: two or more nodes.

    A single node hosts its own rendezvous on loopback, so it needs no Service. The control plane
    then also writes no Endpoints and no EndpointSlice for it.
    """
    return plan.distributed and plan.nodes > 1


def rendezvous_endpoint(plan: WorkloadPlan, owner: dict, attempt: int) -> str:
    """Return the address of node 0 of an attempt: `<job>-0.<service>.<namespace>.svc:29500`,
    or loopback for a single node."""
    if not needs_headless_service(plan):
        return f"127.0.0.1:{RENDEZVOUS_PORT}"
    name = job_name(plan, attempt)
    return f"{name}-0.{name}.{namespace(plan, owner)}.svc:{RENDEZVOUS_PORT}"


def config_map(plan: WorkloadPlan, owner: dict, store: ArtifactStore, attempt: int) -> dict:
    """Return the ConfigMap holding the stage config, with URIs rewritten for the pod."""
    data = builders.pod_config(plan.config, store).model_dump_json()
    size = len(data.encode())
    if size > MAX_CONFIG_MAP_BYTES:
        raise InvalidResourceError(
            f"{plan.kind} {plan.config.namespace}/{plan.name}",
            "spec",
            f"the stage config is {size} bytes, over the {MAX_CONFIG_MAP_BYTES}-byte ConfigMap "
            "limit; shorten the spec, for example by listing fewer source files per resource.",
        )
    metadata = _metadata(plan, owner, attempt, pod_labels(plan, attempt))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {CONFIG_FILE: data},
    }


def _metadata(plan: WorkloadPlan, owner: dict, attempt: int, object_labels: dict) -> dict:
    name = job_name(plan, attempt)
    return builders.object_metadata(name, owner, object_labels, namespace(plan, owner))


def headless_service(plan: WorkloadPlan, owner: dict, attempt: int) -> dict:
    """Return the headless Service that gives the attempt's pods stable DNS names.

    publishNotReadyAddresses publishes a pod's record as soon as the pod has an address, before
    it is Ready, so node 0's name resolves as early as possible.
    """
    selector = pod_labels(plan, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, owner, attempt, selector),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "c10d",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def pod_failure_policy() -> dict:
    """Return the rules that decide what a failed pod means for the attempt.

    0. A pod with the DisruptionTarget condition (preempted, evicted, its node drained) is
       ignored: the Job controller replaces it and the failure does not count.
    1. Exit code 42 (lathe_trainer's EXIT_PERMANENT, bad input) fails the Job: a retry cannot help.
    2. Any other non-zero exit code fails the Job too, so that the Job controller terminates every
       other pod of the attempt within seconds instead of leaving them holding GPUs while their
       torchrun waits for the lost node. The operator then decides whether to retry.
    The first matching rule wins, so the permanent rule comes before the catch-all.
    """
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": [EXIT_PERMANENT],
                },
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "NotIn",
                    "values": [0],
                },
            },
        ]
    }


def training_job(
    plan: WorkloadPlan,
    owner: dict,
    store: ArtifactStore,
    *,
    attempt: int,
    image: str,
    resume: bool,
    queue_name: str | None = None,
    suspend: bool = False,
    s3_secret: str | None = None,
) -> dict:
    """Return the Indexed Job that runs one attempt of a stage.

    A stage that reads or writes s3:// URIs gets every key of the Secret `s3_secret` (from
    LATHE_S3_SECRET) as environment variables.

    The Job is created suspended when `suspend` or the plan's spec.suspend requests it, and when
    a Kueue queue is named, because Kueue admits a Job by unsuspending it.
    """
    template_labels = pod_labels(plan, attempt)
    job_labels = dict(template_labels)
    job_labels[builders.LABEL_RUN_GENERATION] = str(plan.config.generation)
    job_labels[builders.LABEL_RUN] = str(plan.run)
    if queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = queue_name
    # A Corpus runs one pod per worker (spec.workers); each finds its share by its completion
    # index. Every other stage that is not distributed has one node.
    nodes = plan.nodes
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(plan, owner, attempt, job_labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            # One attempt per Job: the operator, not the Job controller, retries, as JobSet does.
            "backoffLimit": 0,
            "podFailurePolicy": pod_failure_policy(),
            "suspend": bool(suspend or plan.suspend or queue_name),
            "template": {
                "metadata": {
                    "labels": {**plan.pod_labels, **template_labels},
                    **({"annotations": dict(plan.pod_annotations)} if plan.pod_annotations else {}),
                },
                "spec": _pod_spec(plan, owner, store, attempt, image, resume, s3_secret),
            },
        },
    }


def _pod_spec(
    plan: WorkloadPlan, owner: dict, store: ArtifactStore, attempt: int, image: str, resume: bool,
    s3_secret: str | None,
) -> dict:
    name = job_name(plan, attempt)
    volumes, mounts = _volumes(plan, store, name)
    module_args = [
        CONFIG_PATH if arg == CONFIG_PATH_PLACEHOLDER else arg for arg in plan.module_args(resume)
    ]
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": launcher.command(module_args),
        "env": _env(plan, owner, attempt),
        "resources": builders.resource_requirements(plan.resources),
        "volumeMounts": mounts,
        # The trainer writes its final metrics to the termination message. On an error without
        # one, the kubelet reports the end of the log instead.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": builders.container_security_context(),
    }
    if builders.uses_object_store(plan.config):
        container["envFrom"] = builders.secret_env(s3_secret)
    spec = {
        # Never: podFailurePolicy requires it, and a failed attempt is replaced as a whole.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": builders.pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }

    ports = []
    if needs_headless_service(plan):
        # With a subdomain, the Job controller's `<job>-<index>` host names resolve as
        # `<job>-<index>.<service>` through the headless Service of the same name.
        spec["subdomain"] = name
        ports.append({"name": "c10d", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    if serves_training_metrics(plan):
        ports.append({"name": "metrics", "containerPort": TRAINER_METRICS_PORT,
                      "protocol": "TCP"})
    if ports:
        container["ports"] = ports
    spec.update(builders.scheduling_fields(plan.scheduling, plan.resources.gpus))
    return spec


def _volumes(plan: WorkloadPlan, store: ArtifactStore, name: str) -> tuple[list, list]:
    """Return the pod volumes and container mounts: config, /dev/shm, /tmp and the claims."""
    store_claims = [store.claim] if store.claim else []
    claims = sorted({*builders.config_claims(plan.config), *store_claims})
    shm, shm_mount = builders.shm_volume(plan.resources.shm_size)
    volumes = [
        {"name": "config", "configMap": {"name": name}},
        shm,
        {"name": "tmp", "emptyDir": {}},
        *builders.claim_volumes(claims),
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        shm_mount,
        {"name": "tmp", "mountPath": "/tmp"},
        *builders.claim_mounts(claims),
    ]
    return volumes, mounts


def processes_per_node(plan: WorkloadPlan) -> int:
    """Return torchrun's --nproc-per-node: one process per GPU on GPU nodes."""
    return plan.processes_per_node


def serves_training_metrics(plan: WorkloadPlan) -> bool:
    """Return whether rank 0 of the plan's stage serves training gauges on
    TRAINER_METRICS_PORT: the PretrainJob stage does."""
    return plan.kind == "PretrainJob"


def _env(plan: WorkloadPlan, owner: dict, attempt: int) -> list[dict]:
    processes = processes_per_node(plan) if plan.distributed else 1
    values = {
        "PYTHONUNBUFFERED": "1",
        "LATHE_ATTEMPT": str(attempt),
        # The stage writes its digest and final metrics here for the operator (see stage.py).
        "LATHE_TERMINATION_LOG": "/dev/termination-log",
        # The pods run as uid 1000, which may have no home directory in the image, so library
        # caches go to the /tmp emptyDir.
        "HOME": "/tmp",
        "OMP_NUM_THREADS": str(_threads_per_process(plan, processes)),
        # Names one attempt, so that the pods of a Corpus attempt exchange their results only
        # with each other.
        "LATHE_RUN_ID": attempt_id(plan, owner, attempt),
    }
    if plan.distributed:
        values |= {
            "NNODES": str(plan.nodes),
            "NPROC": str(processes),
            "RDZV_ENDPOINT": rendezvous_endpoint(plan, owner, attempt),
            # A new id per attempt: a restarted node never joins the rendezvous of a dead attempt.
            "RDZV_ID": attempt_id(plan, owner, attempt),
        }
    if plan.resources.gpus > 0:
        values["NCCL_DEBUG"] = "WARN"
    if serves_training_metrics(plan):
        values["LATHE_TRAINER_METRICS_PORT"] = str(TRAINER_METRICS_PORT)
    values |= plan.env
    return [{"name": key, "value": value} for key, value in values.items()]


def _threads_per_process(plan: WorkloadPlan, processes: int) -> int:
    """Return the CPU cores of the pod divided among its processes, at least 1."""
    match = _CPU_QUANTITY.match(plan.resources.cpu.strip())
    if not match:
        raise InvalidResourceError(
            f"{plan.kind} {plan.config.namespace}/{plan.name}",
            "spec.resources.cpu",
            f"{plan.resources.cpu!r} is not a CPU quantity; write cores such as '4' or '1.5', "
            "or millicores such as '500m'.",
        )
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    return max(1, int(cores // processes))
