# The sidecar image. Multi-stage: the build stage makes a venv, the final stage
# carries only that venv on the same slim base.
#   docker build -t runtime-sidecar .
# (Task definitions, a backend target and the ECR workflow come with the
# deployment work; see README.)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY collectors collectors
COPY detectors detectors
COPY sidecar sidecar
COPY backend backend
RUN python -m venv /opt/runtime-sidecar \
    && /opt/runtime-sidecar/bin/pip install --no-cache-dir . \
    && /opt/runtime-sidecar/bin/pip uninstall -y pip setuptools wheel

FROM ${PYTHON_IMAGE} AS sidecar
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="runtime-sidecar" \
      org.opencontainers.image.description="Runtime threat detection sidecar for ECS tasks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/runtime-sidecar /opt/runtime-sidecar
ENV PATH=/opt/runtime-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# root: reading other containers' /proc entries needs it (with SYS_PTRACE added
# in the task definition); nothing is written outside configured outputs, so
# readonlyRootFilesystem works.
ENTRYPOINT ["runtime-sidecar"]
CMD ["run", "--events-out", "-"]
