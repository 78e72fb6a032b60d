"""The real API server applies the PretrainJob's model and curriculum rules from the CRD."""

from __future__ import annotations

import json

import pytest

BASE = {"corpusRef": {"name": "pubmed"}, "tokenizerRef": {"name": "pubmed"}}


def apply(cluster, namespace, spec: dict):
    manifest = {"apiVersion": "lathe.dev/v1alpha1", "kind": "PretrainJob",
                "metadata": {"name": "lm"}, "spec": {**BASE, **spec}}
    return cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                           input=json.dumps(manifest), check=False)


@pytest.mark.parametrize("spec", [
    {"model": {"architecture": "bert", "objective": "maskedLM", "preset": "125m"}},
    {"model": {"architecture": "t5", "preset": "tiny", "numLayers": 1}},
    {"model": {"objective": "causalLM", "preset": "7b"}},
    {"model": {"architecture": "gpt2", "hiddenSize": 24, "numHeads": 8}},
    {"curriculum": {"stages": [{"untilStep": 10, "sequenceLength": 64, "minQuality": 0.9},
                               {"sequenceLength": 128}]}},
])
def test_model_spec_accepted(cluster, namespace, spec):
    completed = apply(cluster, namespace, spec)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("spec, expected", [
    ({"model": {"architecture": "bert", "objective": "causalLM"}},
     "spec.model.objective must match spec.model.architecture"),
    ({"model": {"objective": "spanCorruption"}},
     "spec.model.objective must match spec.model.architecture"),
    ({"model": {"preset": "13b"}}, "spec.model.preset"),
    ({"model": {"hiddenSize": 24, "numHeads": 8}}, "head size, hiddenSize / numHeads"),
    ({"model": {"preset": "125m", "numHeads": 256}}, "head size, hiddenSize / numHeads"),
    ({"curriculum": {"stages": [{"minQuality": 2}]}}, "minQuality"),
])
def test_model_spec_rejected(cluster, namespace, spec, expected):
    completed = apply(cluster, namespace, spec)
    assert completed.returncode != 0, f"accepted: {spec}"
    assert expected in completed.stderr, completed.stderr
