"""Smoke tests of the cluster bed: fake GPU nodes, the Job controller, scheduler, kwok and GC."""

from __future__ import annotations

import pytest

from bed import GPUS_PER_NODE, NODE_COUNT, NODE_LABEL_SELECTOR

pytestmark = pytest.mark.cluster

JOB_TIMEOUT = "90s"


def indexed_gpu_job(name: str, completions: int) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "worker",
                            # kwok fakes the container, so this image is never pulled.
                            "image": "registry.invalid/lathe/worker:0",
                            "command": ["true"],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        },
    }


def job_pods(cluster, namespace: str, job: str) -> list[dict]:
    selector = f"batch.kubernetes.io/job-name={job}"
    return cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]


def run_job_to_completion(cluster, namespace: str, job: str, completions: int) -> None:
    cluster.apply(indexed_gpu_job(job, completions), namespace)
    cluster.kubectl("wait", "-n", namespace, f"job/{job}", "--for=condition=Complete",
                    f"--timeout={JOB_TIMEOUT}", timeout=120)  # fmt: skip


def test_nodes_have_eight_gpus(bare_cluster):
    nodes = bare_cluster.get_json("nodes", "-l", NODE_LABEL_SELECTOR)["items"]
    assert len(nodes) == NODE_COUNT
    for node in nodes:
        name = node["metadata"]["name"]
        conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS_PER_NODE), name
        assert node["status"]["capacity"]["nvidia.com/gpu"] == str(GPUS_PER_NODE), name
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true", name
        assert conditions.get("Ready") == "True", name
        assert not node["spec"].get("taints"), name


def test_indexed_gpu_job_completes(bare_cluster, namespace):
    run_job_to_completion(bare_cluster, namespace, "smoke", completions=2)

    job = bare_cluster.get_json("job/smoke", "-n", namespace)
    pods = job_pods(bare_cluster, namespace, "smoke")
    node_names = {
        node["metadata"]["name"]
        for node in bare_cluster.get_json("nodes", "-l", NODE_LABEL_SELECTOR)["items"]
    }
    indexes = {pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
               for pod in pods}  # fmt: skip
    assert job["status"]["succeeded"] == 2
    assert job["status"]["completedIndexes"] == "0,1"
    assert indexes == {"0", "1"}
    for pod in pods:
        assert pod["spec"]["nodeName"] in node_names
        assert pod["status"]["phase"] == "Succeeded"


def test_job_deletion_removes_pods(bare_cluster, namespace):
    run_job_to_completion(bare_cluster, namespace, "doomed", completions=2)
    assert len(job_pods(bare_cluster, namespace, "doomed")) == 2

    # Foreground propagation: the garbage collector deletes the pods before the Job itself, so
    # this command returns only after the pods are gone, and times out if the collector is idle.
    bare_cluster.kubectl(
        "delete", "-n", namespace, "job/doomed", "--cascade=foreground", "--wait=true",
        f"--timeout={JOB_TIMEOUT}", timeout=120,
    )  # fmt: skip

    assert job_pods(bare_cluster, namespace, "doomed") == []
    jobs = bare_cluster.get_json("jobs", "-n", namespace)["items"]
    assert jobs == []


def test_bed_restarts_on_occupied_port(bare_cluster, tmp_path, monkeypatch):
    """A port that another process takes between free_port() and the component's bind makes
    the bed start again on new ports, instead of failing the suite."""
    import socket

    import bed

    occupied = socket.socket()
    occupied.bind(("127.0.0.1", 0))
    occupied.listen()
    ports = iter([occupied.getsockname()[1]])
    real_free_port = bed.free_port
    monkeypatch.setattr(bed, "free_port", lambda: next(ports, None) or real_free_port())
    restarted = bed.ClusterBed(bare_cluster.bed.bin_dir, tmp_path, apiserver_only=True)
    try:
        restarted.start()
        assert restarted.server.startswith("https://127.0.0.1:")
        # The API server's port is the first one the bed requests.
        assert "address already in use" in (tmp_path / "logs" / "kube-apiserver.log").read_text()
        assert restarted.server != f"https://127.0.0.1:{occupied.getsockname()[1]}"
    finally:
        restarted.stop()
        occupied.close()
