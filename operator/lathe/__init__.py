"""Lathe: a Kubernetes operator that builds domain-specific language models end to end."""

__version__ = "0.1.0"
