# syntax=docker/dockerfile:1
# The Lathe Triton image: NVIDIA's Triton Inference Server 24.10 (Triton 2.51, the version the
# tests run from nvidia-pytriton) plus the Python packages that the Python-backend models of an
# exported model repository import (images/triton-requirements.txt). ModelDeployment pods run
# it unless spec.serving.image names another. Build from the repository root:
#   docker build -f images/triton.Dockerfile -t lathe-triton:dev .
# NOTE: the base is pinned by tag only. Its digest is recorded in no source this project could
# reach; pin it with `docker buildx imagetools inspect` (images/README.md).

FROM nvcr.io/nvidia/tritonserver:24.10-py3 AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base's Python 3.10 installs the pinned wheels into a directory of their own, which the
# final stage puts on PYTHONPATH; Triton's Python backend stub inherits it.
COPY images/triton-requirements.txt /tmp/
RUN python3 -m pip install --no-deps --no-cache-dir --only-binary=:all: \
        --target /opt/lathe/python -r /tmp/triton-requirements.txt \
    && PYTHONPATH=/opt/lathe/python python3 -c "import numpy, onnxruntime, tokenizers"


FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/lathe-dev/lathe
LABEL org.opencontainers.image.title="lathe-triton" \
      org.opencontainers.image.description="Triton Inference Server with the Python packages of Lathe's model repositories." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /opt/lathe/python /opt/lathe/python

ENV PYTHONPATH=/opt/lathe/python \
    PYTHONDONTWRITEBYTECODE=1

# NB: 1000:1000 is the pods' runAsUser and runAsGroup, which they set themselves too.
USER 1000:1000
