# reranker-server: one Dockerfile, two images. Needs BuildKit (the default since Docker 23; on older
# Docker: DOCKER_BUILDKIT=1 docker build ...). docs/deployment.md explains the options.
#
#   CPU image (default):  docker build -t reranker-server .
#   CUDA image:           docker build --build-arg VARIANT=cuda -t reranker-server:cuda .
#   Models baked in:      docker build --build-arg BAKE_MODELS=true -t reranker-server:baked .
#
# The install is the README's and CI's: torch==2.13.0 first (the CPU wheel from PyTorch's CPU index,
# or PyPI's CUDA build), then the project from pyproject.toml with its `torch` extra (the
# sentence-transformers stage 2). tests/test_docker.py checks that this
# file agrees with .ci/run, the README and the CLI, and runs its health and download commands.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.11
# The server runs as this user. Bind-mounted caches must be writable by it: create ./hf_cache
# yourself (so it is yours), and build with --build-arg APP_UID=$(id -u) or run with --user.
ARG APP_UID=1000

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
ARG APP_UID
RUN groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid app app \
    && mkdir -p /app/hf_cache \
    && chown app:app /app/hf_cache
WORKDIR /app

# --- torch: the only difference between the two images
FROM base AS torch-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

FROM base AS torch-cuda
ARG TORCH_VERSION=2.13.0
# PyPI's Linux wheel is the CUDA build (it brings the CUDA runtime); the driver comes from the host
# through the NVIDIA Container Toolkit. For an older driver pick a PyTorch CUDA index, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- the server, on top of the chosen torch
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS server
COPY pyproject.toml README.md /app/
COPY reranker_server /app/reranker_server
# (".[torch]" is this project and its extra, not an unpinned package: DL3013 does not apply)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[torch]" \
    && pip check

# HF_HOME and the server's model cache are one directory, so that
# `-v "$(pwd)/hf_cache:/app/hf_cache"` keeps every model across restarts.
ENV HF_HOME=/app/hf_cache \
    RERANKER_MODEL_CACHE_DIR=/app/hf_cache \
    RERANKER_HOST=0.0.0.0 \
    RERANKER_PORT=5200
ARG APP_UID
USER ${APP_UID}:${APP_UID}

# Optional: fetch both models at build time (`reranker-server download`). DOWNLOAD_FLAGS takes the
# same flags, e.g. "--stage1-model NAME --hub-endpoint URL". A volume mounted over /app/hf_cache
# hides baked models: run a baked image without one.
ARG BAKE_MODELS=false
ARG DOWNLOAD_FLAGS=""
# hadolint ignore=SC2086
RUN if [ "${BAKE_MODELS}" = "true" ]; then reranker-server download ${DOWNLOAD_FLAGS}; fi

EXPOSE 5200
# The server listens only once both models are loaded: the start period covers the first download.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RERANKER_PORT', '5200'), timeout=8); sys.exit(json.load(r).get('status') != 'ok')"]
# Exec form: reranker-server is PID 1 and gets SIGTERM; it then drains (RERANKER_DRAIN_TIMEOUT_S,
# 120 s; give `docker stop -t 140`). Arguments after the image name replace `serve`, e.g. `serve --candidates 20`.
ENTRYPOINT ["reranker-server"]
CMD ["serve"]
