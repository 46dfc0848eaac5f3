# fleetticketsd container image.
#
# Two stages so the runtime image carries no pip/build caches or sources:
# the builder installs the project into a self-contained venv, the runtime
# stage copies only that venv. Both stages use the same base image, so the
# venv's interpreter path (/usr/local/bin/python3.11) is valid in both.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

# uv installs exactly the versions of uv.lock (the Makefile's UV_VERSION; keep them
# together). It comes from PyPI like everything else, not from another registry.
ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy
RUN pip install "uv==${UV_VERSION}"

WORKDIR /src
# .dockerignore whitelists only what the wheel needs (pyproject.toml, uv.lock,
# README.md, fleetticketsd/, migrations/), so this cannot leak local configs or secrets.
COPY . .
# The locked runtime dependencies (no test extra), then the project itself as a regular
# (non-editable) install: hatchling force-includes migrations/ into the package, so
# `fleetticketsd migrate` finds them without the source tree.
RUN uv sync --frozen --no-dev --no-editable --python "$(command -v python)"


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="fleetticketsd" \
      org.opencontainers.image.description="Keeps PostgreSQL/PostGIS in step with the field-ops ticket change streams in S3"

# Feed file names and cron schedules are in EAT, so a shell in the container
# (`date`, psql's now()) shows the same clock as the bucket's names. Log lines
# stay UTC (ISO 8601 with Z) on purpose: log pipelines expect that.
ENV TZ=Africa/Nairobi \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Fixed, high UID/GID so volume permissions and Kubernetes runAsUser policies
# can rely on it; no login shell, nothing in the image is writable by it.
RUN groupadd --system --gid 10001 fleetticketsd \
 && useradd --system --uid 10001 --gid fleetticketsd \
        --home-dir /app --no-create-home --shell /usr/sbin/nologin fleetticketsd

COPY --from=builder /opt/venv /opt/venv

# Default `--config` is ./config.toml; mount one here or set FLEETTICKETSD_CONFIG.
WORKDIR /app
USER fleetticketsd:fleetticketsd

# /metrics, /healthz, /readyz ([server] listen).
EXPOSE 9464

# Liveness only: /healthz does no DB call, so a database outage does not get
# a healthy daemon restarted. No curl in slim; urlopen raises (exit 1) on any
# non-2xx answer or connection error. One-shot commands (migrate, drain, ...)
# should disable this check where they run (see docker-compose.yml).
# Port 9464 is [server] listen's default; change both together.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

# Exec form: the daemon is PID 1 and receives SIGTERM directly for its
# graceful shutdown. Any subcommand can be run with `docker run IMAGE <cmd>`.
ENTRYPOINT ["fleetticketsd"]
CMD ["run"]
