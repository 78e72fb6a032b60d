# syntax=docker/dockerfile:1
# The Lathe operator image: the `lathe` package and the packages it needs to run the kopf
# operator (images/operator-requirements.txt), on a slim Python base. Build from the repository
# root:
#   docker build -f images/operator.Dockerfile -t lathe-operator:dev .
# The base is pinned by tag and digest; see images/README.md for how to refresh the digest.

FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91 AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The virtual environment has no pip of its own: the base image's pip installs into it, so the
# final image carries no installer beside the base's.
COPY images/operator-requirements.txt images/
RUN python -m venv --without-pip /opt/lathe \
    && pip --python /opt/lathe/bin/python install --no-deps --no-cache-dir \
        -r images/operator-requirements.txt

# The project last, so a code change reuses the dependency layer above. Its dependencies are
# already pinned above, hence --no-deps.
COPY pyproject.toml ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip --python /opt/lathe/bin/python install --no-deps --no-cache-dir . \
    && /opt/lathe/bin/python -c "import lathe.k8s.handlers"


FROM python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/lathe-dev/lathe
LABEL org.opencontainers.image.title="lathe-operator" \
      org.opencontainers.image.description="The Lathe Kubernetes operator (kopf)." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# NB: the UID is numeric, so the kubelet can verify runAsNonRoot, and it is the chart's default
# runAsUser (podSecurityContext in charts/lathe/values.yaml).
RUN groupadd --system --gid 65532 lathe \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin lathe

COPY --from=builder /opt/lathe /opt/lathe

ENV PATH=/opt/lathe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 65532:65532
WORKDIR /tmp

ENTRYPOINT ["kopf", "run"]
CMD ["--all-namespaces", "--module", "lathe.k8s.handlers"]
