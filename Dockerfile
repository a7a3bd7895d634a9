# syntax=docker/dockerfile:1
#
# Stoker's two images, built with any standard builder (docker buildx, buildah, kaniko):
#
#   docker build --target operator -t stoker-operator:0.1.0 .   # operator, API, CLI: no torch
#   docker build --target agent    -t stoker-agent:0.1.0 .      # agent: torch, diffusers, CUDA
#
# Both install exactly the pins that their install needs (requirements-operator.lock and
# requirements-agent.lock, generated from requirements.lock by hack/lock-subset.py), run as a non-root
# user, and work with a read-only root filesystem (the chart mounts emptyDirs where they
# write). hack/build-images.sh builds the same images on a machine without a registry.
#
# Base images are pinned by digest; bump tag and digest together.
ARG PYTHON_BASE=docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
# CUDA 13.0 matches the CUDA libraries that torch's wheels bring (nvidia-*-cu13); the `base`
# flavour adds the CUDA runtime and the settings the NVIDIA container toolkit reads, without a
# second copy of cuBLAS/cuDNN (the `runtime` flavour would add about 2 GB that torch already ships).
ARG CUDA_BASE=docker.io/nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:7c7413a56200486f71f181cad9310f6fd31b6bb21816ade15fc9c1e1e927a5c1
ARG VERSION=0.1.0
ARG REVISION=unknown

# ---- the wheel, built once for both targets ----
FROM ${PYTHON_BASE} AS build
WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --disable-pip-version-check -q \
      $(grep -iE '^(setuptools|build|packaging|pyproject_hooks)==' requirements.lock)
COPY pyproject.toml README.md LICENSE requirements-operator.lock requirements-agent.lock ./
COPY stoker ./stoker
COPY operator ./operator
COPY agent ./agent
RUN python -m build --wheel --no-isolation --outdir /out . \
 && cp requirements-operator.lock requirements-agent.lock /out/

# ---- operator: the API types, the CLI and the operator ----
FROM ${PYTHON_BASE} AS operator
ARG VERSION REVISION
LABEL org.opencontainers.image.title="stoker-operator" \
      org.opencontainers.image.description="Stoker operator: schedules GenerationJobs onto cache agents and keeps ModelCache replicas warm" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/stoker-dev/stoker"
RUN --mount=type=bind,from=build,source=/out,target=/out \
    --mount=type=cache,target=/root/.cache/pip \
    python -m pip install --disable-pip-version-check -q --no-deps -r /out/requirements-operator.lock \
 && python -m pip install --disable-pip-version-check -q --no-deps /out/stoker-*.whl \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stoker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["stoker-operator"]

# ---- agent: the operator's packages plus torch, diffusers and CUDA ----
FROM ${CUDA_BASE} AS agent
ARG VERSION REVISION
LABEL org.opencontainers.image.title="stoker-agent" \
      org.opencontainers.image.description="Stoker agent: caches models on a GPU pod, loads them and runs generation jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/stoker-dev/stoker"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/stoker
ENV PATH=/opt/stoker/bin:$PATH
RUN --mount=type=bind,from=build,source=/out,target=/out \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --disable-pip-version-check -q --no-deps -r /out/requirements-agent.lock \
 && pip install --disable-pip-version-check -q --no-deps /out/stoker-*.whl \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stoker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["stoker-agent"]
