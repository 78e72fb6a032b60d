# syntax=docker/dockerfile:1
# The Lathe trainer image: what the stage Jobs run (`python -m lathe_trainer STAGE`, torchrun)
# and what copies a model repository into a Triton pod. The PyTorch base brings torch
# 2.13.0+cu130 with its CUDA 13.0 and cuDNN 9 libraries, the build that requirements.lock
# pins; the other packages come from images/trainer-requirements.txt. Build from the repository
# root:
#   docker build -f images/trainer.Dockerfile -t lathe-trainer:dev .
# The base is pinned by tag and digest; see images/README.md for how to refresh the digest.

FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime@sha256:db80a41f8428644cebcb3d75b0b62df334ab6c0e75785951eb25f48bfbd42407 AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Wheels first, so packages published only as source archives (seqeval) are built here and
# never in the final image.
COPY images/trainer-requirements.txt images/
RUN python3 -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels \
        -r images/trainer-requirements.txt

COPY pyproject.toml ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN python3 -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# NB: --target installs into a directory of its own instead of the base's site-packages, which
# the base marks as externally managed (PEP 668). It also keeps the base's torch: nothing here
# depends on pip resolving torch again.
RUN python3 -m pip install --no-deps --no-index --no-cache-dir --target /opt/lathe/python \
        /wheels/*.whl \
    && PYTHONPATH=/opt/lathe/python python3 -c "import torch, transformers, lathe_trainer"


FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime@sha256:db80a41f8428644cebcb3d75b0b62df334ab6c0e75785951eb25f48bfbd42407

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/lathe-dev/lathe
LABEL org.opencontainers.image.title="lathe-trainer" \
      org.opencontainers.image.description="Lathe stage workloads: corpus, tokenizer, training, export." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NB: the UID is numeric and matches the pods' runAsUser (1000). Ubuntu-based images may
# already have a user and group with that id, which is then reused. The stage launcher and the
# model-repository sync call `python`, which Debian and Ubuntu interpreters may lack.
RUN if ! getent group 1000 > /dev/null; then groupadd --gid 1000 lathe; fi \
    && if ! getent passwd 1000 > /dev/null; then \
        useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin lathe; \
    fi \
    && if ! command -v python > /dev/null; then \
        ln -s "$(command -v python3)" /usr/local/bin/python; \
    fi

COPY --from=builder /opt/lathe /opt/lathe

# PYTHONPATH comes before the base's site-packages, so the locked versions (numpy 1.26.4 among
# them) win over any copy the base ships.
ENV PYTHONPATH=/opt/lathe/python \
    PATH=/opt/lathe/python/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp

USER 1000:1000
WORKDIR /tmp

CMD ["python", "-m", "lathe_trainer", "--help"]
