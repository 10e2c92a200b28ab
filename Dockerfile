# syntax=docker/dockerfile:1.7
# musetalk-flow GPU worker image: the serve process (HTTP /hc + /generate, buffer loop) beside the Salad
# HTTP job-queue worker; the same image runs the benchmark by a command override:
#
#   docker build --build-arg SALAD_WORKER_SHA256=<sha256 of the release tarball> -t musetalk-flow:0.1.0 .
#   docker build --build-arg INSTALL_SALAD_WORKER=false -t musetalk-flow:0.1.0-buffer .   # buffer GPUs
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro --env-file .env musetalk-flow:0.1.0
#   docker run --gpus all -v /srv/models:/models:ro musetalk-flow:0.1.0 \
#       python -m benchmarks --profile full-random --out /app/results/bench.json
#
# Weights are mounted at MUSETALK_MODELS_DIR (/models), or baked with --build-arg BAKE_MODELS=true (runs
# `musetalk-flow models download`, needs internet at build time; adds ~5 GB).
#
# The base is CUDA's small `base` flavour on purpose: the CUDA torch wheels bring their own CUDA runtime,
# cuBLAS and cuDNN, so the `runtime` flavour would only add a second copy of them (~2.5 GB).
#
# torch and the base are a pair: PyPI's torch 2.13.0 Linux x86_64 wheel is a CUDA 13.0 build (its metadata
# requires cuda-toolkit==13.0.3 and nvidia-cudnn-cu13), so the base is CUDA 13.0 on Ubuntu 24.04 (Python
# 3.12, matching the cp312 wheel). CUDA 13 needs an NVIDIA driver >= 580; the base's NVIDIA_REQUIRE_CUDA
# makes the container runtime refuse older drivers at start, and MUSETALK_DEVICE=cuda makes the worker
# refuse to become ready without a GPU instead of rendering on the CPU. The build checks torch's CUDA major.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# The Salad HTTP job-queue worker binary, fetched by version and verified by its sha256.
FROM ${CUDA_IMAGE} AS salad-worker
ARG INSTALL_SALAD_WORKER=true
ARG SALAD_WORKER_VERSION=0.6.0
ARG SALAD_WORKER_SHA256=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN mkdir -p /out \
 && if [ "$INSTALL_SALAD_WORKER" = "true" ]; then \
      if [ -z "$SALAD_WORKER_SHA256" ]; then \
        echo "set --build-arg SALAD_WORKER_SHA256=<sha256 of salad-http-job-queue-worker_x86_64.tar.gz v${SALAD_WORKER_VERSION}>" \
             "or --build-arg INSTALL_SALAD_WORKER=false" >&2; exit 1; \
      fi; \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
      && curl -fsSL --retry 3 -o /tmp/worker.tar.gz \
         "https://github.com/SaladTechnologies/salad-cloud-job-queue-worker/releases/download/v${SALAD_WORKER_VERSION}/salad-http-job-queue-worker_x86_64.tar.gz" \
      && echo "${SALAD_WORKER_SHA256}  /tmp/worker.tar.gz" | sha256sum --check --strict - \
      && mkdir /tmp/worker && tar -xzf /tmp/worker.tar.gz -C /tmp/worker \
      && install -m 0755 "$(find /tmp/worker -type f -name salad-http-job-queue-worker | head -n 1)" /out/ \
      && rm -rf /tmp/worker /tmp/worker.tar.gz /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG TORCH_VERSION=2.13.0
# PyPI's default torch wheel for Linux x86_64 is the CUDA 13.0 build; TORCH_CUDA_MAJOR is what the build
# checks torch.version.cuda against (change both with TORCH_INDEX_URL and CUDA_IMAGE, as one pair).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_CUDA_MAJOR=13
ARG BAKE_MODELS=false

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    MUSETALK_WORKDIR=/app \
    MUSETALK_MODELS_DIR=/models \
    MUSETALK_CACHE_DIR=/app/cache \
    MUSETALK_DEVICE=cuda \
    PREFECT_HOME=/app/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS=false \
    PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY=false \
    PORT=8000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages track the base image's Ubuntu release (security updates included), so they are not
# pinned one by one. ffmpeg/ffprobe encode and probe media (NVENC when the driver exposes it; libx264
# otherwise); espeak-ng makes the benchmark's speech; tini reaps zombies and forwards signals; gcc and the
# Python headers let Triton build its kernel launcher for the `compiled` mode (without them it falls back).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ffmpeg \
      espeak-ng tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app

# torch first, in its own layer: it is most of the image and changes least often
RUN python3 -m venv /opt/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && python -c "import sys, torch; cuda = torch.version.cuda or 'none'; \
sys.exit(0 if cuda.split('.')[0] == '${TORCH_CUDA_MAJOR}' else \
f'torch {torch.__version__} is built for CUDA {cuda}, not ${TORCH_CUDA_MAJOR}.x: pick the pair again')"

WORKDIR /app
COPY pyproject.toml README.md gpu_targets.json salad_prices.json ./
COPY musetalk_engine/ musetalk_engine/
COPY tasks/ tasks/
COPY flows/ flows/
COPY benchmarks/ benchmarks/
COPY deployments/ deployments/
# torch is already satisfied, so this adds only the project and its other dependencies (their versions are
# bounded by pyproject.toml; prefect is pinned there)
# hadolint ignore=DL3013
RUN pip install ".[download]" \
 && python -c "import torch, deployments.serve; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN mkdir -p /models /app/results /app/cache /app/tmp /app/.prefect \
 && if [ "$BAKE_MODELS" = "true" ]; then musetalk-flow models download /models; fi \
 && chown -R app:app /models /app/results /app/cache /app/tmp /app/.prefect

COPY --from=salad-worker /out/ /usr/local/bin/

USER 10001:10001
EXPOSE 8000
# Salad's own probes should also point at /hc; start-period covers loading real weights + warm-up.
HEALTHCHECK --interval=15s --timeout=6s --start-period=300s --retries=3 CMD ["/app/deployments/entrypoint.sh", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/app/deployments/entrypoint.sh"]
