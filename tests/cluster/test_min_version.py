"""The CRDs install and validate on the oldest Kubernetes release that the chart supports.

The rest of tests/cluster runs on the bed's release (scripts/cluster-bed/versions.env). This
module starts etcd and the kube-apiserver of scripts/cluster-bed/min-version/versions.env on
127.0.0.1, installs crds/, creates the PubMed example and runs the case tables of
test_validation.py against that server. It needs no controllers, because nothing here runs a Job.

The binaries come from `make cluster-bed-min-version`, which `make test` runs too and which
compiles them once into the cache (about 5 minutes on 2 cores). Without them every test here is
skipped, so that a pytest run never starts a compile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_validation import BASES, DATA_PATHS, INVALID, INVALID_NAMES, VALID, build

from bed import (
    APISERVER_BINARIES,
    MIN_VERSION_BUILD_SCRIPT,
    MIN_VERSION_SCRIPTS,
    REPO,
    ClusterBed,
    min_version_bin_dir,
    missing_files,
    read_versions,
)

pytestmark = pytest.mark.cluster

CRD_DIR = REPO / "crds"
EXAMPLE_DIR = REPO / "examples" / "pubmed"
CHART_FILE = REPO / "charts" / "lathe" / "Chart.yaml"
# Dry runs use NAMESPACE, and the example is created for real in EXAMPLE_NAMESPACE.
NAMESPACE = "min-version"
EXAMPLE_NAMESPACE = "min-version-example"


# Text that the API server formats itself and that changed after Kubernetes 1.29. Each entry is
# the first minor release with the wording of test_validation.py, a pattern of that wording and
# the older wording. The releases come from the sources of k8s.io/apiextensions-apiserver and
# k8s.io/apimachinery. No pattern touches a message of Lathe's CRDs (a rule's message or
# messageExpression and its fieldPath), so those must match exactly on every release.
OLDER_WORDING = [
    # A failed CEL rule on a scalar reports the schema type in place of the value. Every
    # `Invalid value` in the tables of test_validation.py comes from a CEL rule.
    (35, r'Invalid value: "[^"]*": ', 'Invalid value: "string": '),
    # On an int-or-string field (a quantity), it reports an empty string instead.
    (35, r'Invalid value: ("string"|-?[0-9]+): (?=(a quantity|not a Kubernetes quantity))',
     'Invalid value: "": '),
    # A repeated key of a map-type list was printed with Go's %#v, not as JSON.
    (33, r"Duplicate value: \{", "Duplicate value: map[string]interface {}{"),
    (32, r"Too long: may not be more than (\d+) bytes", r"Too long: may not be longer than \1"),
]


def in_wording_of(expected: str, minor: int) -> str:
    """Rewrite a message of test_validation.py into the wording of Kubernetes 1.<minor>."""
    for changed_in, pattern, older in OLDER_WORDING:
        if minor < changed_in:
            expected = re.sub(pattern, older, expected)
    return expected


def min_kubernetes_version() -> str:
    return read_versions(MIN_VERSION_SCRIPTS / "versions.env")["KUBERNETES_VERSION"]


def min_minor_release() -> int:
    return int(min_kubernetes_version().split(".")[1])


def crd_files() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def min_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterBed]:
    """etcd and kube-apiserver of the minimum version, with crds/ installed."""
    bin_dir = min_version_bin_dir()
    missing = missing_files(bin_dir, APISERVER_BINARIES)
    if missing:
        pytest.skip(
            f"{bin_dir} lacks {', '.join(missing)}; build Kubernetes {min_kubernetes_version()} "
            f"once with `make cluster-bed-min-version` ({MIN_VERSION_BUILD_SCRIPT}), about 5 "
            f"minutes on 2 cores with Go 1.26 and the Go module proxy."
        )
    bed = ClusterBed(bin_dir, tmp_path_factory.mktemp("min-version-bed"), apiserver_only=True)
    bed.start()
    try:
        file_args = [arg for path in crd_files() for arg in ("-f", str(path))]
        # Server-side apply, as for the main bed: a large CRD would overflow client-side
        # apply's annotation (256 KiB).
        bed.kubectl("apply", "--server-side", *file_args)
        bed.kubectl("wait", "--for=condition=Established", "--timeout=60s", *file_args,
                    timeout=90)  # fmt: skip
        for namespace in (NAMESPACE, EXAMPLE_NAMESPACE):
            bed.kubectl("create", "namespace", namespace)
        yield bed
    finally:
        bed.stop()


def dry_run(bed: ClusterBed, manifest: dict):
    return bed.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", "-",
                       input=json.dumps(manifest), check=False)  # fmt: skip


def test_server_is_min_version(min_bed):
    version = min_bed.api_get("/version")
    assert version is not None
    assert version["gitVersion"] == min_kubernetes_version()


def test_min_version_matches_chart():
    """versions.env must follow the chart's kubeVersion, so this module tests its lower bound."""
    kube_version = yaml.safe_load(CHART_FILE.read_text())["kubeVersion"]
    lower_bound = re.match(r">=\s*v?(\d+)\.(\d+)", kube_version)
    assert lower_bound, kube_version
    minor_release = re.match(r"v(\d+)\.(\d+)\.", min_kubernetes_version())
    assert minor_release.groups() == lower_bound.groups()


@pytest.mark.parametrize(("message", "minor", "expected"), [
    ('spec.data.train: Invalid value: "file://x": file:// data paths', 29,
     'spec.data.train: Invalid value: "string": file:// data paths'),
    ('spec.data.train: Invalid value: "file://x": file:// data paths', 35,
     'spec.data.train: Invalid value: "file://x": file:// data paths'),
    ('spec.sources[1]: Duplicate value: {"name":"a"}', 32,
     'spec.sources[1]: Duplicate value: map[string]interface {}{"name":"a"}'),
    ('spec.sources[1]: Duplicate value: {"name":"a"}', 33,
     'spec.sources[1]: Duplicate value: {"name":"a"}'),
    ("metadata.name: Too long: may not be more than 63 bytes", 31,
     "metadata.name: Too long: may not be longer than 63"),
    ('spec.resources.memory: Invalid value: "4GB": not a Kubernetes quantity', 29,
     'spec.resources.memory: Invalid value: "": not a Kubernetes quantity'),
    ("spec.resources.memory: Invalid value: 0: a quantity must be more than zero", 29,
     'spec.resources.memory: Invalid value: "": a quantity must be more than zero'),
    ("spec.specialTokens must include <|endoftext|>", 29,
     "spec.specialTokens must include <|endoftext|>"),
])
def test_older_wording_by_release(message, minor, expected):
    assert in_wording_of(message, minor) == expected


@pytest.mark.parametrize("path", crd_files(), ids=lambda path: path.stem)
def test_crd_is_established(min_bed, path):
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    crd = json.loads(min_bed.kubectl("get", "crd", name, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("NamesAccepted") == "True", crd["status"]
    assert conditions.get("Established") == "True", crd["status"]


def test_example_is_created(min_bed):
    """`kubectl apply -f examples/pubmed/` as docs/install.md shows it, stored for real."""
    completed = min_bed.kubectl("apply", "-n", EXAMPLE_NAMESPACE, "-f", str(EXAMPLE_DIR),
                                check=False)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    for path in sorted(EXAMPLE_DIR.glob("*.yaml")):
        example = yaml.safe_load(path.read_text())
        kind, name = example["kind"], example["metadata"]["name"]
        stored = min_bed.kubectl("get", f"{kind.lower()}.lathe.dev", name, "-n",
                                 EXAMPLE_NAMESPACE, "-o", "json", check=False)  # fmt: skip
        assert stored.returncode == 0, f"{path.name}: {stored.stderr}"
        assert json.loads(stored.stdout)["spec"], path.name


@pytest.mark.parametrize("kind", sorted(BASES))
def test_valid_base_is_accepted(min_bed, kind):
    completed = dry_run(min_bed, build(kind, {}))
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(("kind", "change", "expected"), INVALID,
                         ids=[f"{k}-{e[:40]}" for k, _, e in INVALID])
def test_invalid_spec_is_rejected(min_bed, kind, change, expected):
    completed = dry_run(min_bed, build(kind, change))
    assert completed.returncode != 0, f"accepted: {change}"
    assert in_wording_of(expected, min_minor_release()) in completed.stderr, completed.stderr


@pytest.mark.parametrize(("kind", "change"), VALID, ids=[k for k, _ in VALID])
def test_valid_change_is_accepted(min_bed, kind, change):
    completed = dry_run(min_bed, build(kind, change))
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(("name", "expected"), INVALID_NAMES)
def test_invalid_resource_name_rejected(min_bed, name, expected):
    manifest = build("Corpus", {})
    manifest["metadata"]["name"] = name
    completed = dry_run(min_bed, manifest)
    assert completed.returncode != 0, f"accepted: {name}"
    assert in_wording_of(expected, min_minor_release()) in completed.stderr, completed.stderr


def test_unknown_field_is_rejected(min_bed):
    completed = dry_run(min_bed, build("PretrainJob", {"trainng": {"maxSteps": 3}}))
    assert completed.returncode != 0
    assert 'unknown field "spec.trainng"' in completed.stderr


def test_data_paths_judged_alike(min_bed):
    """Each data path gets the same verdict from this server as from the API models."""
    from pydantic import ValidationError

    from lathe.api import KINDS

    verdicts = {}
    for path in DATA_PATHS:
        manifest = build("Corpus", {"sources": [{"name": "x", "format": "text", "path": path}]})
        completed = dry_run(min_bed, manifest)
        try:
            KINDS["Corpus"].model_validate(manifest)
            models_accept = True
        except ValidationError:
            models_accept = False
        verdicts[path] = (completed.returncode == 0, models_accept)
    assert {path: server for path, (server, _) in verdicts.items()} == {
        path: models for path, (_, models) in verdicts.items()}
