"""The Kubernetes backend: pure builders of Jobs, Services and Deployments from plans
(`builders`, `builders_training`, `builders_serving`, `launcher`), and the operator's
settings, metrics and progress reading.
"""
