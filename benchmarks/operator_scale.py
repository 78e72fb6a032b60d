"""Measure how the operator copes with many PretrainJobs applied at once.

Usage: `python benchmarks/operator_scale.py [--count 1000]`. It starts the local cluster bed
(tests/cluster/bed.py) with enough kwok nodes for every pod and installs the CRDs from crds/. It
runs the operator as its own process (`python -m kopf run --standalone --all-namespaces
-m loopback_only -m lathe.k8s.handlers`, the first module from tests/cluster) and lets one
Corpus and one Tokenizer succeed. Then it applies COUNT
single-node CPU-only PretrainJobs with several concurrent server-side applies. It reports the seconds until every
Job exists and until every PretrainJob has a condition, the operator's peak resident memory
(sampled every 0.2 s), and the PretrainJob reconcile count and p50/p95 duration from the
operator's /metrics. It appends a row to the table between the markers in docs/benchmarks.md.
The targets are 60 s or less for 1,000 PretrainJobs and 200 MB or less of resident memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from bed import ClusterBed, build, free_port  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- operator-scale:begin -->"
END = "<!-- operator-scale:end -->"
EXAMPLES = REPO / "examples" / "pubmed"
NAMESPACE = "bench"
INPUT_NAME = "bench-input"
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 200.0
PODS_PER_NODE = 110
# kwok completes a Job's pod after this delay, so every PretrainJob's pod stays Running. With the
# delay alone, the bed's pod-complete Stage (kwok 0.8.0) completed the pods within seconds, so the
# jitter delay is set too.
HOLD = {
    "pod-complete.stage.kwok.x-k8s.io/delay": "3600s",
    "pod-complete.stage.kwok.x-k8s.io/jitter-delay": "3600s",
}
RSS_SAMPLE_SECONDS = 0.2
POLL_SECONDS = 1.0
# kubectl sends one request per object and waits for each response, so one process creates only
# a few PretrainJobs a second here. Several processes apply in parallel.
APPLIERS = 8
JOB_SELECTOR = "app.kubernetes.io/managed-by=lathe-operator,lathe.dev/kind=PretrainJob"


@dataclass
class Result:
    count: int
    nodes: int
    appliers: int
    apply_s: float = math.nan
    jobs_s: float = math.nan
    conditions_s: float = math.nan
    jobs_seen: int = 0
    conditions_seen: int = 0
    idle_rss_mb: float = math.nan
    peak_rss_mb: float = math.nan
    cpu_s: float = math.nan
    reconciles: int = 0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    events: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: list[str] = field(default_factory=list)


class RssSampler(threading.Thread):
    """Samples a process's resident set size every RSS_SAMPLE_SECONDS and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            self.stopping.wait(RSS_SAMPLE_SECONDS)


def pretrain_job(index: int) -> dict:
    """Return a single-node, CPU-only PretrainJob whose pod kwok keeps Running."""
    return {
        "apiVersion": "lathe.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": f"scale-{index:05d}", "namespace": NAMESPACE},
        "spec": {
            "corpusRef": {"name": INPUT_NAME},
            "tokenizerRef": {"name": INPUT_NAME},
            "distributed": {"nodes": 1, "procsPerNode": 1},
            "resources": {"gpus": 0, "cpu": "100m", "memory": "64Mi", "shmSize": "64Mi"},
            "training": {"maxSteps": 100},
            "podMetadata": {"annotations": HOLD},
        },
    }


def input_documents() -> list[dict]:
    """Return the example Corpus and Tokenizer, renamed, with pods that complete at once."""
    documents = []
    for path in ("01-corpus.yaml", "02-tokenizer.yaml"):
        for document in yaml.safe_load_all((EXAMPLES / path).read_text()):
            if not document:
                continue
            document["metadata"] = {"name": INPUT_NAME, "namespace": NAMESPACE}
            if document["kind"] == "Tokenizer":
                document["spec"]["corpusRef"]["name"] = INPUT_NAME
            documents.append(document)
    return documents


def install_crds(bed: ClusterBed) -> None:
    files = sorted((REPO / "crds").glob("*.yaml"))
    file_args = [arg for path in files for arg in ("-f", str(path))]
    bed.kubectl("apply", "--server-side", *file_args)
    bed.kubectl("wait", "--for=condition=Established", "--timeout=60s", *file_args, timeout=90)


def wait(condition, description: str, timeout: float, bed: ClusterBed) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        bed.check_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout:.0f} s waiting for {description}.")
        time.sleep(0.5)


class FirstSeen(threading.Thread):
    """Watcher that records when each object of a collection first matches a predicate.

    A watch costs the API server one message per change. Polling a list of 1,000 objects every
    second made it serialize megabytes a second, which took CPU from the bed being measured.
    """

    def __init__(self, bed: ClusterBed, path: str, predicate) -> None:
        super().__init__(daemon=True)
        self.bed, self.path, self.predicate = bed, path, predicate
        self.first_seen: dict[str, float] = {}
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def _note(self, item: dict) -> None:
        name = item["metadata"]["name"]
        if name not in self.first_seen and self.predicate(item):
            self.first_seen[name] = time.monotonic()

    def run(self) -> None:
        body = self.bed.api_get(self.path)
        if body is None:
            raise RuntimeError(f"Listing {self.path} failed; see the bed's kube-apiserver.log.")
        for item in body.get("items", []):
            self._note(item)
        version = body["metadata"]["resourceVersion"]
        self.ready.set()
        separator = "&" if "?" in self.path else "?"
        while not self.stopping.is_set():
            url = (f"{self.bed.server}{self.path}{separator}watch=1&timeoutSeconds=60"
                   f"&allowWatchBookmarks=true&resourceVersion={version}")  # fmt: skip
            try:
                with urllib.request.urlopen(url, context=self.bed._admin_tls(), timeout=90) as stream:
                    for line in stream:
                        event = json.loads(line)
                        item = event["object"]
                        version = item["metadata"]["resourceVersion"]
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._note(item)
                        if self.stopping.is_set():
                            return
            except OSError:
                time.sleep(0.5)  # the stream broke; resume from the last version seen


def api_requests(bed: ClusterBed) -> dict[tuple[str, str, str], float]:
    """Return kube-apiserver's request counts by client-facing verb, resource and subresource."""
    with urllib.request.urlopen(f"{bed.server}/metrics", context=bed._admin_tls(),
                                timeout=30) as response:  # fmt: skip
        text = response.read().decode()
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name != "apiserver_request_total":
                continue
            labels = sample.labels
            key = (labels.get("verb", ""), labels.get("resource", ""),
                   labels.get("subresource", ""))  # fmt: skip
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def list_items(bed: ClusterBed, path: str) -> list[dict]:
    body = bed.api_get(path)
    return [] if body is None else body.get("items", [])


def tokenizer_succeeded(bed: ClusterBed) -> bool:
    body = bed.api_get(f"/apis/lathe.dev/v1alpha1/namespaces/{NAMESPACE}/tokenizers/{INPUT_NAME}")
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Succeeded" and c["status"] == "True" for c in conditions)


def start_operator(kubeconfig: Path, work_dir: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "LATHE_ARTIFACT_ROOT": f"file://{work_dir / 'artifacts'}",
        "LATHE_METRICS_PORT": str(port),
        "LATHE_METRICS_HOST": "127.0.0.1",
        "LATHE_TRAINER_IMAGE": "lathe-trainer:bench",
        "LATHE_SYNC_IMAGE": "lathe-trainer:bench",
        # kwok's pod addresses belong to no host here. The operator reads rank 0's metrics
        # port there when the output folder does not exist, so tests/cluster/loopback_only
        # refuses every connection off loopback before it leaves the machine.
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "tests" / "cluster"), os.environ.get("PYTHONPATH", "")]),
    }
    log_file = (work_dir / "operator.log").open("w")
    command = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces",
               "-m", "loopback_only", "-m", "lathe.k8s.handlers"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            cwd=REPO)  # fmt: skip


def scrape(url: str) -> dict[str, list]:
    """Return the operator's PretrainJob reconcile counter and duration histogram buckets."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    count = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("kind") != "PretrainJob":
                continue
            if sample.name == "lathe_reconciles_total":
                count += sample.value
            elif sample.name == "lathe_reconcile_duration_seconds_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    return {"count": [count], "buckets": sorted(buckets.items())}


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Estimate a quantile from cumulative buckets as PromQL's histogram_quantile does."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower_bound
            fraction = (rank - lower_count) / max(cumulative - lower_count, 1e-12)
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def difference(after: dict, before: dict) -> tuple[int, list[tuple[float, float]]]:
    earlier = dict(before["buckets"])
    buckets = [(bound, value - earlier.get(bound, 0.0)) for bound, value in after["buckets"]]
    return int(after["count"][0] - before["count"][0]), buckets


def apply_concurrently(bed: ClusterBed, manifests: list[Path], timeout: float) -> None:
    """Run one `kubectl apply --server-side` per manifest, all at once, and wait for all."""
    processes = [
        subprocess.Popen(
            [bed.kubectl_path, f"--kubeconfig={bed.kubeconfig}", "apply", "--server-side",
             "-f", str(manifest)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for manifest in manifests
    ]
    failures = []
    for manifest, process in zip(manifests, processes):
        _, stderr = process.communicate(timeout=timeout)
        if process.returncode:
            failures.append(f"{manifest.name}: {stderr.strip()[-500:]}")
    if failures:
        raise RuntimeError("kubectl apply failed for " + "; ".join(failures))


def measure(bed: ClusterBed, result: Result, metrics_url: str, pid: int,
            manifests: list[Path], timeout: float) -> None:  # fmt: skip
    """Apply the PretrainJobs, time them and fill in result."""
    operator = psutil.Process(pid)
    result.idle_rss_mb = operator.memory_info().rss / 1e6
    cpu_before = sum(operator.cpu_times()[:2])
    metrics_before = scrape(metrics_url)
    sampler = RssSampler(pid)
    sampler.start()
    jobs = FirstSeen(
        bed, f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs?labelSelector={JOB_SELECTOR}",
        lambda item: True,
    )
    conditions = FirstSeen(
        bed, f"/apis/lathe.dev/v1alpha1/namespaces/{NAMESPACE}/pretrainjobs",
        lambda item: bool((item.get("status") or {}).get("conditions")),
    )
    for watcher in (jobs, conditions):
        watcher.start()
        watcher.ready.wait(60)
    requests_before = api_requests(bed)
    result.load_before = os.getloadavg()
    started = time.monotonic()
    apply_concurrently(bed, manifests, timeout)
    result.apply_s = time.monotonic() - started
    deadline = started + timeout
    while time.monotonic() < deadline and (
        len(jobs.first_seen) < result.count or len(conditions.first_seen) < result.count
    ):
        if operator.status() == psutil.STATUS_ZOMBIE or not operator.is_running():
            raise RuntimeError("The operator exited during the run; see operator.log.")
        time.sleep(POLL_SECONDS)
    for watcher in (jobs, conditions):
        watcher.stopping.set()
    result.jobs_seen = len(jobs.first_seen)
    result.conditions_seen = len(conditions.first_seen)
    if result.jobs_seen >= result.count:
        result.jobs_s = max(jobs.first_seen.values()) - started
    if result.conditions_seen >= result.count:
        result.conditions_s = max(conditions.first_seen.values()) - started
    # Let the follow-up events (status patches, Job status changes) settle before the totals.
    time.sleep(5)
    sampler.stopping.set()
    sampler.join()
    result.load_after = os.getloadavg()
    result.peak_rss_mb = sampler.peak / 1e6
    result.cpu_s = sum(operator.cpu_times()[:2]) - cpu_before
    result.reconciles, buckets = difference(scrape(metrics_url), metrics_before)
    result.p50_ms = quantile(0.5, buckets) * 1000
    result.p95_ms = quantile(0.95, buckets) * 1000
    requests_after = api_requests(bed)
    served = {key: requests_after[key] - requests_before.get(key, 0.0) for key in requests_after}
    busiest = sorted(served.items(), key=lambda pair: -pair[1])[:12]
    print("kube-apiserver requests during the run (verb resource/subresource: count):")
    for (verb, resource, subresource), value in busiest:
        print(f"  {verb} {resource}{'/' + subresource if subresource else ''}: {value:.0f}")
    events = list_items(bed, f"/api/v1/namespaces/{NAMESPACE}/events?limit=100000")
    result.events = sum(1 for event in events
                        if event.get("involvedObject", {}).get("kind") == "PretrainJob")
    print(f"{len(events)} events in namespace {NAMESPACE}, {result.events} about PretrainJobs.")


def run(count: int, appliers: int, timeout: float, keep: bool) -> Result:
    nodes = math.ceil((count + 20) / PODS_PER_NODE)
    result = Result(count=count, nodes=nodes, appliers=appliers)
    work_dir = Path(tempfile.mkdtemp(prefix="lathe-operator-scale-"))
    bed = ClusterBed(build(), work_dir / "bed", node_count=nodes)
    bed.start()
    operator = None
    try:
        install_crds(bed)
        bed.kubectl("create", "namespace", NAMESPACE)
        wait(lambda: bed.api_get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default")
             is not None, "the default ServiceAccount", 60, bed)  # fmt: skip
        port = free_port()
        operator = start_operator(bed.kubeconfig, work_dir, port)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait(lambda: _answers(metrics_url), "the operator's metrics endpoint", 60, bed)
        inputs = {"apiVersion": "v1", "kind": "List", "items": input_documents()}
        bed.kubectl("apply", "-f", "-", input=json.dumps(inputs))
        wait(lambda: tokenizer_succeeded(bed), "the input Tokenizer to succeed", 180, bed)
        items = [pretrain_job(index) for index in range(count)]
        manifests = []
        for part in range(appliers):
            manifest = work_dir / f"pretrainjobs-{part}.json"
            manifest.write_text(json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": items[part::appliers]}
            ))
            manifests.append(manifest)
        measure(bed, result, metrics_url, operator.pid, manifests, timeout)
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()
        bed.stop()
        if keep:
            print(f"Kept the work directory {work_dir} (operator.log, bed logs).")
        else:
            subprocess.run(["rm", "-rf", str(work_dir)], check=False)
    return result


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def git_label() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip()
    dirty = git("status", "--porcelain", "--", "operator", "crds").strip()
    return f"{commit}{' + local changes' if dirty else ''}"


def seconds(value: float, seen: int, count: int, apply_s: float) -> str:
    """Format a time from the start of the apply, with the part after the apply ended."""
    if math.isnan(value):
        return f"timed out ({seen}/{count})"
    return f"{value:.1f} ({max(value - apply_s, 0.0):.1f})"


def table_row(result: Result, label: str) -> str:
    within = (
        not math.isnan(result.conditions_s) and not math.isnan(result.jobs_s)
        and max(result.jobs_s, result.conditions_s) <= TARGET_SECONDS
    )
    memory_ok = result.peak_rss_mb <= TARGET_RSS_MB
    load = "/".join(f"{value:.2f}" for value in result.load_before)
    load += f"; {result.load_after[0]:.2f}"
    cells = [
        datetime.date.today().isoformat(), label, str(result.count), str(result.nodes), load,
        str(result.appliers), f"{result.apply_s:.1f}",
        seconds(result.jobs_s, result.jobs_seen, result.count, result.apply_s),
        seconds(result.conditions_s, result.conditions_seen, result.count, result.apply_s),
        f"{result.idle_rss_mb:.0f} / {result.peak_rss_mb:.0f}", f"{result.cpu_s:.0f}",
        str(result.reconciles), f"{result.p50_ms:.0f} / {result.p95_ms:.0f}", str(result.events),
        f"{'pass' if within else 'miss'} / {'pass' if memory_ok else 'miss'}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| Date | Operator | PretrainJobs | Nodes | Load before; 1 min after | Appliers | Apply (s) "
    "| All Jobs (s) | All conditions (s) | RSS idle / peak (MB) | Operator CPU (s) "
    "| Reconciles | p50 / p95 (ms) | Events | Time / memory |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def method_text(machine: str) -> str:
    return f"""## Operator scale

`python benchmarks/operator_scale.py --count 1000` starts the local cluster bed (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler and kwok from `tests/cluster/bed.py`) with
one kwok node per {PODS_PER_NODE} pods, installs the CRDs, and runs the operator as its own
process (`python -m kopf run --standalone --all-namespaces -m loopback_only -m lathe.k8s.handlers`;
`loopback_only`, from `tests/cluster`, refuses connections off loopback, such as to kwok's pod
addresses). Once one
Corpus and one Tokenizer have succeeded, it splits the PretrainJobs into as many Lists as the
Appliers column says and runs one `kubectl apply --server-side` per List, all at once (runs
before 2026-12-04 evening used one). Each PretrainJob is single-node and CPU-only (100m CPU,
64Mi memory), and its pod annotations `pod-complete.stage.kwok.x-k8s.io/delay: 3600s` and
`pod-complete.stage.kwok.x-k8s.io/jitter-delay: 3600s` keep the pod Running.

Columns:

- Appliers: concurrent `kubectl apply` processes.
- Apply: seconds until the last `kubectl apply` ended. kubectl sends one request per object and
  waits for each response, so the operator already reconciles the first PretrainJobs meanwhile.
- The two times after it are counted from the start of the apply, with the seconds after the
  apply ended in brackets. Two watches (on the Jobs and on the PretrainJobs) note when each
  object first appears or first has a condition, so the times are exact to the watch's delay.
  Runs before 2026-12-04 evening polled both lists once a second, which cost the API server
  megabytes of JSON a second at 1,000 objects.
- All Jobs: until every PretrainJob's Job exists (label selector
  `{JOB_SELECTOR}`).
- All conditions: until every PretrainJob's status has at least one condition.
- RSS: the operator process's resident memory before the apply and its peak during the run,
  sampled every {RSS_SAMPLE_SECONDS} s with psutil.
- Operator CPU: user plus system CPU seconds the operator used during the run.
- Reconciles, p50 / p95: PretrainJob reconciles during the run and their duration quantiles,
  estimated from the operator's `lathe_reconcile_duration_seconds` histogram as PromQL's
  `histogram_quantile` does, so they are only as fine as its buckets.
- Events: Kubernetes Events about PretrainJobs in the benchmark namespace at the end.
- Load: `os.getloadavg()` (1, 5 and 15 min) just before the apply, and the 1-minute load at the
  end. The machine is shared, so a load above its core count means other work competed with the
  bed and the operator.
- Time / memory: pass when every Job and condition appeared within {TARGET_SECONDS:.0f} s (the
  target is set for 1,000 PretrainJobs), and when the peak RSS stayed at or below
  {TARGET_RSS_MB:.0f} MB.

The bed, the operator and this script share the machine's cores, so the times include the
API server's, etcd's and kube-controller-manager's work. Machine of the last run:
{machine}.
Earlier rows: those marked "another machine" ran on Linux-6.18.44-fc-v1147, the other rows
before 9fcc267 on machines with the v1252 kernel, and the rows up to 6a4501c on one where the
applies alone took about twice as long.
"""


def write_doc(result: Result, label: str) -> None:
    machine = f"{platform.platform()}, Python {platform.python_version()}, " \
              f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB memory"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    rows: list[str] = []
    notes = ""
    if BEGIN in text and END in text:
        start, rest = text.split(BEGIN, 1)
        old, end = rest.split(END, 1)
        rows = [line for line in old.splitlines() if re.match(r"^\| \d{4}-\d{2}-\d{2} ", line)]
        # Text written below the table (findings of earlier runs) is kept as it is.
        if rows:
            notes = old.split(rows[-1], 1)[1].strip("\n")
    else:
        start, end = text.rstrip("\n") + "\n\n", "\n"
    rows.append(table_row(result, label))
    parts = [method_text(machine), HEADER, *rows]
    if notes:
        parts.append("\n" + notes)
    section = "\n".join(parts) + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"{start}{BEGIN}\n{section}{END}{end}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="PretrainJobs to apply at once.")
    parser.add_argument("--appliers", type=int, default=APPLIERS,
                        help="kubectl apply processes that share the PretrainJobs.")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="Seconds to wait for every Job and condition before giving up.")
    parser.add_argument("--label", default=None,
                        help="Operator column of the table row (default: the git commit).")
    parser.add_argument("--no-doc", action="store_true",
                        help="Print the result without writing docs/benchmarks.md.")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the work directory with the operator's and the bed's logs.")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}.")
    if not 1 <= args.appliers <= args.count:
        parser.error(f"--appliers must be between 1 and --count ({args.count}), "
                     f"got {args.appliers}.")
    result = run(args.count, args.appliers, args.timeout, args.keep)
    label = args.label or git_label()
    row = table_row(result, label)
    print(HEADER)
    print(row)
    if not args.no_doc:
        write_doc(result, label)
        print(f"Wrote the result to {DOC}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
