"""Serving a Lathe NER model: the Triton Python-backend models, a local `tritonserver` and the
in-process reference that served answers are compared with."""
