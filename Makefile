# Entry points. `make demo` and `make test` install what they need on a fresh machine.
SHELL := /bin/bash
PYTHON := .venv/bin/python
export LATHE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: env demo test test-unit crds check-crds bench clean

# The Python environment is built once in a cache directory keyed by requirements.lock and
# linked as .venv (see scripts/python-env.sh).
env:
	@ln -sfn "$$(scripts/python-env.sh)" .venv

demo: env
	.venv/bin/lathe run -f examples/pubmed/

test: env check-crds
	$(PYTHON) -m pytest -p no:cacheprovider tests

test-unit: env
	$(PYTHON) -m pytest -p no:cacheprovider tests/unit

crds: env
	$(PYTHON) -m lathe.crdgen

check-crds: env
	$(PYTHON) -m lathe.crdgen --check

bench: env
	$(PYTHON) benchmarks/pipeline.py

clean:
	rm -rf lathe-workspace .venv
