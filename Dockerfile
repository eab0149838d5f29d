# Two images from one Dockerfile (BuildKit builds only the stages a target needs):
#   docker build --target sidecar -t runtime-sidecar:0.1.0 .    the agent, added to each ECS task
#   docker build --target backend -t runtime-backend:0.1.0 .    the collector API and GuardDuty-compatible API
# `runtime-manager publish-repo` creates the private ECR repository and prints the push commands.
# The install step of both is docker/install.sh; tests/test_dockerfile.py runs it in a fresh venv and lints
# this file with hadolint (no Docker engine in CI).

# The base, pinned by tag here and by digest for releases: resolve the digest where a registry is reachable
# (`docker buildx imagetools inspect python:3.11-slim-bookworm`) and build with
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# so that a rebuild of a release is the same base, byte for byte.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build stages: a venv per image, made by the same script the tests run ---------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/install.sh docker/install.sh
COPY collectors collectors
COPY detectors detectors
COPY sidecar sidecar
COPY backend backend
RUN sh docker/install.sh sidecar /opt/runtime-sidecar /src

FROM build AS build-backend
RUN sh docker/install.sh backend /opt/runtime-backend /src

# -- the sidecar --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS sidecar
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/ecs-runtime-monitor/ecs-runtime-monitor
LABEL org.opencontainers.image.title="runtime-sidecar" \
      org.opencontainers.image.description="Runtime threat detection sidecar for Amazon ECS and AWS Fargate tasks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/runtime-sidecar /opt/runtime-sidecar
# The state directory (findings spool, threat lists, health file) is the one writable path the task definition
# mounts (a task volume), so readonlyRootFilesystem works; without a volume the sidecar keeps its spool in
# memory and writes its health file to /dev/shm. Bytecode was compiled at install: nothing is written to the venv.
RUN mkdir -p /var/lib/runtime-sidecar && chmod 0700 /var/lib/runtime-sidecar
ENV PATH=/opt/runtime-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RUNTIME_SIDECAR_STATE_DIR=/var/lib/runtime-sidecar
# Root, on purpose. Reading other containers' /proc/<pid>/{exe,cwd,environ,fd} passes the kernel's ptrace access
# check only with CAP_SYS_PTRACE in the effective set, and reading their files (inotify through /proc/<pid>/root)
# takes DAC_OVERRIDE. A non-root user gets no effective capabilities from a task definition (Docker and ECS set no
# ambient capabilities), and file capabilities on the interpreter would make it fail to start in any task that
# does not add SYS_PTRACE. What can be dropped is dropped: the task definitions add only SYS_PTRACE and drop every
# Docker default but NET_RAW (DNS and SYN capture) and DAC_OVERRIDE; the image has no pip, no compiler and no
# backend code.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["runtime-sidecar", "health"]
ENTRYPOINT ["runtime-sidecar"]
CMD ["run", "--findings-out", "-"]

# -- the backend --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS backend
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/ecs-runtime-monitor/ecs-runtime-monitor
LABEL org.opencontainers.image.title="runtime-backend" \
      org.opencontainers.image.description="Collector API, findings store and GuardDuty-compatible API for the runtime sidecars" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/runtime-backend --create-home \
        --shell /usr/sbin/nologin runtime-backend
COPY --from=build-backend /opt/runtime-backend /opt/runtime-backend
ENV PATH=/opt/runtime-backend/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RUNTIME_BACKEND_HOST=0.0.0.0 \
    RUNTIME_BACKEND_PORT=8080 \
    RUNTIME_BACKEND_DATABASE_URL=sqlite:////var/lib/runtime-backend/runtime-backend.db
WORKDIR /var/lib/runtime-backend
USER 10001:10001
EXPOSE 8080
# /healthz on the port and scheme the backend serves (a self-signed certificate is fine for this local probe)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = bool(os.environ.get('RUNTIME_BACKEND_TLS_CERT')); r.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('RUNTIME_BACKEND_PORT', '8080') + '/healthz', timeout=4, context=ssl._create_unverified_context() if tls else None)"]
ENTRYPOINT ["runtime-backend"]
CMD ["serve"]
