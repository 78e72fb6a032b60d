# Entry points. `make demo` and `make test` install what they need on a fresh machine.
SHELL := /bin/bash
PYTHON := .venv/bin/python
export LATHE_DATA_DIR ?= $(abspath ../shared/data)
# The environment is shared by every checkout on the machine, and its editable install points at
# the checkout that ran `make env` last; this makes the current checkout's code win.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer

.PHONY: env tools demo test test-unit test-chart crds check-crds bench \
	cluster-bed cluster-bed-min-version cluster-up cluster-down e2e-kind clean

# The Python environment is built once in a cache directory keyed by requirements.lock and
# linked as .venv (see scripts/python-env.sh).
env:
	@ln -sfn "$$(scripts/python-env.sh)" .venv

# Test tools built or installed once into ~/.cache/lathe: the Kubernetes test bed (about 40 min
# of compiling the first time on 2 cores), helm (about 15 min), SeaweedFS for the s3:// tests
# (several minutes), Debian's prometheus/promtool, and the Prometheus Operator's PodMonitor CRD
# for the PodMonitor cluster test (a 4 MB module download).
tools: cluster-bed cluster-bed-min-version
	scripts/tools/helm.sh >/dev/null
	scripts/tools/seaweedfs.sh >/dev/null
	scripts/tools/prometheus.sh >/dev/null
	scripts/tools/podmonitor-crd.sh >/dev/null

demo: env
	.venv/bin/lathe run -f examples/pubmed/

# The whole suite: unit, stage, serving, chart and cluster tests. The kind suite needs Docker
# and runs with `make e2e-kind`.
test: env tools check-crds
	$(PYTHON) -m pytest -p no:cacheprovider -m "not kind" tests

test-unit: env
	$(PYTHON) -m pytest -p no:cacheprovider tests/unit

test-chart: env tools
	$(PYTHON) -m pytest -p no:cacheprovider tests/chart

crds: env
	$(PYTHON) -m lathe.crdgen

check-crds: env
	$(PYTHON) -m lathe.crdgen --check

bench: env
	$(PYTHON) benchmarks/pipeline.py

# The local Kubernetes test bed for tests/cluster (see scripts/cluster-bed/build.sh).
cluster-bed:
	scripts/cluster-bed/build.sh >/dev/null

# etcd and kube-apiserver of the oldest Kubernetes release the chart supports, for
# tests/cluster/test_min_version.py, which is skipped without them (see
# scripts/cluster-bed/min-version/build.sh). The first build takes about 5 minutes on 2 cores.
cluster-bed-min-version:
	scripts/cluster-bed/min-version/build.sh >/dev/null

# Runs until Ctrl-C or `make cluster-down`; prints `export KUBECONFIG=...`.
cluster-up: env cluster-bed
	$(PYTHON) tests/cluster/bed.py up

cluster-down: env
	$(PYTHON) tests/cluster/bed.py down

e2e-kind: env
	$(PYTHON) -m pytest -p no:cacheprovider -m kind tests/e2e/kind -v

clean:
	rm -rf lathe-workspace .venv
