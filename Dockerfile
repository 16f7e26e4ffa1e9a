# reranker-server: one Dockerfile, three images. Needs BuildKit (the default since Docker 23; on
# older Docker: DOCKER_BUILDKIT=1 docker build ...). docs/deployment.md explains the options.
#
#   CPU image (default, no torch): docker build -t reranker-server .
#   CPU image with torch:          docker build --build-arg VARIANT=torch-cpu -t reranker-server:torch .
#   CUDA image:                    docker build --build-arg VARIANT=cuda -t reranker-server:cuda .
#   Models baked in:               docker build --build-arg BAKE_MODELS=true -t reranker-server:baked .
#
# The default image runs both stages through ONNX Runtime (FlashRank, then the cross-encoder's ONNX
# export: RERANKER_STAGE2_KIND=onnx-cross-encoder), the base install of pyproject.toml. The torch
# variants install torch==2.13.0 first (the CPU wheel from PyTorch's CPU index, or PyPI's CUDA
# build), then the project with its `torch` extra. Every variant installs under
# deploy/docker/constraints.txt (pip freeze of a clean install), so a commit builds the same image
# twice. tests/test_docker.py checks that this file agrees with .ci/run, the README and the CLI.

ARG VARIANT=cpu
ARG PYTHON_VERSION=3.11
# The server runs as this user; the model cache volume (/app/hf_cache) belongs to it.
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
COPY deploy/docker/constraints.txt /app/deploy/docker/constraints.txt

# --- what stage 2 runs on: the only difference between the images
FROM base AS runtime-cpu
# No torch: stage 2 runs the cross-encoder's ONNX export (int8 where the model has it) on ONNX
# Runtime, on the CPU: the whole cascade, FlashRank -> cross-encoder, without a GPU.
ENV RERANKER_STAGE2_KIND=onnx-cross-encoder \
    RERANKER_STAGE2_ON_CPU=true

FROM base AS runtime-torch-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
        -c deploy/docker/constraints.txt

FROM base AS runtime-cuda
ARG TORCH_VERSION=2.13.0
# PyPI's Linux wheel is the CUDA build (it brings the CUDA runtime); the driver comes from the host
# through the NVIDIA Container Toolkit. For an older driver pick a PyTorch CUDA index, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
        -c deploy/docker/constraints.txt
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- the server, on top of the chosen runtime: with the `torch` extra where torch is installed
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS server
COPY pyproject.toml README.md /app/
COPY reranker_server /app/reranker_server
COPY deploy/docker/entrypoint.sh /app/deploy/docker/entrypoint.sh
# (".${extra}" is this project and maybe its extra, not an unpinned package: DL3013 does not apply)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    extra=""; if pip show --quiet torch 2>/dev/null; then extra="[torch]"; fi \
    && pip install -c deploy/docker/constraints.txt ".${extra}" \
    && pip check

# HF_HOME and the server's model cache are one directory: one volume keeps every model.
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

# A named volume over /app/hf_cache starts as a copy of this directory: owned by APP_UID.
VOLUME ["/app/hf_cache"]
EXPOSE 5200
# The server listens only once both models are loaded: the start period covers the first download,
# and a check every 5 s turns the container healthy within seconds of that (Docker before 25 has no
# --start-interval).
HEALTHCHECK --interval=5s --timeout=4s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RERANKER_PORT', '5200'), timeout=3); sys.exit(json.load(r).get('status') != 'ok')"]
# Exec form, and the entrypoint execs: reranker-server is PID 1 and gets SIGTERM; it then drains
# (RERANKER_DRAIN_TIMEOUT_S). Stop with the grace of docs/deployment.md ("Stopping"):
# `docker stop -t 140`. Arguments after the image name replace `serve` (`serve --candidates 20`,
# `download`); a program of the image runs as itself (`python -c ...`, `sh`).
ENTRYPOINT ["/app/deploy/docker/entrypoint.sh"]
CMD ["serve"]
