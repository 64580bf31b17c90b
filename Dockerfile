# syntax=docker/dockerfile:1
# istio-vault-agent image: `docker build -t istio-vault-agent:0.1.0 .`
# Runs as uid/gid 1337 (the uid istiod and istio-proxy run as, so 0600 key files stay
# readable to them) and needs no writable path outside its mounted volumes, so it works
# with readOnlyRootFilesystem: true.
#
# Reproducible: the base image is pinned by digest and every Python package by hash
# (requirements.lock, requirements-build.lock). Without a Docker engine (docs/install.md, "1. Build the image"):
#   buildah bud --isolation chroot -t istio-vault-agent:0.1.0 .

# python:3.12.11-slim-bookworm. The digest was taken from public Dockerfiles that pin this tag; it could
# not be checked against the registry where this file was written: check it before a release with
#   docker buildx imagetools inspect python:3.12.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:519591d6871b7bc437060736b9f7456b8731f1499a57e22e6c285135ae657bf7

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY requirements.lock requirements-build.lock pyproject.toml README.md ./
COPY agent ./agent

# The locked runtime dependencies (wheels only, each checked against its hash) plus our own
# wheel, built with the locked setuptools; the final stage installs offline from this set.
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements-build.lock \
    && pip download --no-cache-dir --require-hashes --no-deps --only-binary=:all: --dest /wheels \
        -r requirements.lock \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && cp requirements.lock /wheels/


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="istio-vault-agent" \
      org.opencontainers.image.description="Gives Istio its CA from Vault or OpenBao, validated like istiod, published atomically." \
      org.opencontainers.image.licenses="Apache-2.0"

# The venv is made without pip and filled by the base image's pip, so the runtime image
# carries no installer of its own; pip compiles the .pyc files here, at build time,
# because nothing may be written at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/istio-vault-agent \
    && pip --python /opt/istio-vault-agent/bin/python install \
        --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels \
        --require-hashes --no-deps -r /wheels/requirements.lock \
    && pip --python /opt/istio-vault-agent/bin/python install \
        --no-cache-dir --disable-pip-version-check --no-index --no-deps \
        /wheels/istio_vault_agent-*.whl \
    && groupadd --system --gid 1337 istio-vault-agent \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin istio-vault-agent

ENV PATH=/opt/istio-vault-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ISTIO_VAULT_AGENT_CONFIG=/etc/istio-vault-agent/config.yaml

# Numeric, so the kubelet can enforce runAsNonRoot without resolving a name.
USER 1337:1337
WORKDIR /
EXPOSE 8099

ENTRYPOINT ["istio-vault-agent"]
CMD ["run", "--mode", "sidecar"]
