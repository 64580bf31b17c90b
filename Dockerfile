# syntax=docker/dockerfile:1
# istio-vault-agent image: `docker build -t istio-vault-agent:0.1.0 .`
# Runs as uid/gid 1337 (the uid istiod and istio-proxy run as, so 0600 key files stay
# readable to them) and needs no writable path outside its mounted volumes, so it works
# with readOnlyRootFilesystem: true.

FROM python:3.12.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent

# Our wheel plus wheels of its runtime dependencies only (no [test] extra), so the
# final stage installs offline from exactly this set.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .


FROM python:3.12.11-slim-bookworm

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
