# syntax=docker/dockerfile:1
#
# camserve: the CIFAR-10 ResNet service as a container image.
#
#   docker build -t camserve .
#   docker run --rm -p 8000:8000 -p 8001:8001 camserve     # REST on 8000, gRPC on 8001
#
# A CPU-only image (torch without CUDA, with OpenVINO: 1.7 GB to pull instead of 6.2 GB), for CPU nodes:
#
#   docker build --build-arg TORCH_VARIANT=cpu -t camserve:cpu .
#
# It installs torch from PyTorch's CPU wheel index (TORCH_CPU_INDEX_URL; empty: pip's configured
# sources, e.g. a local mirror or find-links that hold a +cpu wheel) at the version pinned in
# requirements/serve.lock, or TORCH_CPU_VERSION (serving needs torch 2.13 or newer).
#
# Every other package comes from the lock, pinned and checked against its sha256 (pip --require-hashes):
# requirements/serve.lock for the CUDA image (torch and its CUDA libraries from PyPI, hashed too),
# requirements/serve-cpu.lock for the CPU image (the same less torch and its CUDA libraries). The CPU
# build of torch is the one package installed unhashed: PyTorch's CPU index is not where the locks are
# compiled (`make lock`), so its wheels' hashes cannot be recorded there.
#
# OpenVINO (pinned in pyproject.toml) runs /predict's forward in the CPU image (CAMSERVE_RUNTIME=auto picks
# it on a CPU, and the INT8 network the bundle ships); the CUDA image leaves it out and serves on torch, as
# before. NNCF, which quantizes, is a training extra and in neither.
#
# Four stages:
#   base     the Python 3.11 runtime (the official slim image by default; any Debian-family image
#            whose apt can install python3.11 works too, e.g. a locally imported debootstrap rootfs,
#            see docker/build-and-smoke.sh) plus tini as PID 1.
#   builder  a virtual environment at /opt/venv with the project's runtime dependencies from the lock
#            (no Lightning, no torchvision: those live in the `train` extra) and the camserve wheel.
#   bundle   the shipped model bundle, permissions fixed.
#   runtime  base + /opt/venv + the bundle, run as an unprivileged user.
#
# BASE_IMAGE must provide python3.11 or an apt that can install it.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# tini forwards SIGTERM to the service and reaps zombies. python3.11 comes from apt only when the
# base image has none of its own (the official python images keep theirs in /usr/local).
# hadolint ignore=DL3008
RUN python_pkg=""; \
    if ! command -v python3.11 >/dev/null 2>&1; then python_pkg=python3.11; fi; \
    apt-get update \
    && apt-get install -y --no-install-recommends tini ${python_pkg:+"$python_pkg"} \
    && rm -rf /var/lib/apt/lists/*


FROM base AS builder
# Optional, for builds that must use a local package mirror: point PIP_CONFIG_FILE at a pip.conf
# bind-mounted into the build (docker/build-and-smoke.sh does this with podman build -v). Unset, pip
# uses its defaults (PyPI). Nothing of it reaches the runtime stage.
ARG PIP_CONFIG_FILE
ARG DEBIAN_FRONTEND=noninteractive
# cuda: torch as pinned, from pip's index (the CUDA build on Linux); cpu: the CPU-only build.
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CPU_VERSION=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's python3.11 keeps ensurepip (needed by venv) in a separate package.
# hadolint ignore=DL3008
RUN if ! python3.11 -c 'import ensurepip' >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from the lock alone, so that code changes do not reinstall torch.
# The CPU variant installs torch first, on its own and without its dependencies (the lock has them).
COPY requirements/serve.lock requirements/serve-cpu.lock ./requirements/
# DL3013: torch's version is pinned, through a build argument hadolint cannot read.
# hadolint ignore=DL3013
RUN case "${TORCH_VARIANT}" in \
        cuda) pip install --require-hashes -r requirements/serve.lock ;; \
        cpu) pinned=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements/serve.lock) \
            && pip install --no-deps ${TORCH_CPU_INDEX_URL:+--index-url "${TORCH_CPU_INDEX_URL}"} "torch==${TORCH_CPU_VERSION:-${pinned}}" \
            && pip install --require-hashes -r requirements/serve-cpu.lock \
            && python -c 'import sys, torch; sys.exit(f"CUDA build of torch {torch.__version__} in the CPU image" if torch.version.cuda else 0)' \
            && pip freeze > /tmp/installed.txt \
            && if grep -i '^nvidia-' /tmp/installed.txt; then echo "CUDA libraries in the CPU image" >&2; exit 1; fi ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip check

# Then the project itself, as a wheel, without touching the dependencies (pyproject.toml: the wheel's
# metadata and packages; the locks above are what installed its dependencies).
COPY pyproject.toml README.md ./
COPY camcore ./camcore
COPY service ./service
COPY training ./training
RUN pip wheel --no-deps --wheel-dir /tmp/dist . \
    && pip install --no-deps /tmp/dist/camserve-*.whl \
    && python -c 'import camcore, service.app' \
    && python -c 'import importlib.util as u, sys; bad = [m for m in ("lightning", "torchvision", "nncf") if u.find_spec(m)]; sys.exit(f"training-only packages in the runtime venv: {bad}" if bad else 0)' \
    && if [ "${TORCH_VARIANT}" = cpu ]; then python -c 'import openvino, camcore.openvino_forward; print("openvino", openvino.get_version())'; fi


FROM base AS bundle
# The shipped bundle, made world-readable: an export can leave model.safetensors 0600 and its
# directory 0700 (safetensors and mkdtemp defaults), which the unprivileged user could not read.
COPY models/cifar10-resnet /opt/camserve/models/cifar10-resnet
RUN chmod -R u=rwX,go=rX /opt/camserve/models


FROM base AS runtime
ARG CAMSERVE_UID=10001
RUN groupadd --gid "${CAMSERVE_UID}" camserve \
    && useradd --no-log-init --uid "${CAMSERVE_UID}" --gid camserve --create-home --home-dir /home/camserve \
        --shell /usr/sbin/nologin camserve
WORKDIR /opt/camserve
# The shipped bundle. To serve another one, mount its directory (readable by uid 10001) and point
# CAMSERVE_MODEL_DIR at it:
#   docker run -v /path/to/bundle:/models/mine:ro -e CAMSERVE_MODEL_DIR=/models/mine camserve
COPY --from=bundle /opt/camserve/models /opt/camserve/models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/camserve \
    CAMSERVE_HOST=0.0.0.0 \
    CAMSERVE_PORT=8000 \
    CAMSERVE_GRPC_PORT=8001 \
    CAMSERVE_MODEL_DIR=/opt/camserve/models/cifar10-resnet
USER ${CAMSERVE_UID}:${CAMSERVE_UID}
# 8000: HTTP (the JSON API, the Open Inference Protocol over REST, /metrics); 8001: the protocol over
# gRPC (inference.GRPCInferenceService, and grpc.health.v1.Health for gRPC probes).
EXPOSE 8000 8001
# Ready means the bundle is loaded and the service answers; a model that failed to load turns the
# container unhealthy. Python's urllib: the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CAMSERVE_PORT', '8000'), timeout=4).status == 200 else 1)"]
# On SIGTERM uvicorn stops accepting, finishes in-flight requests (the service drains its batchers),
# then re-raises the signal, so python ends "killed by SIGTERM" (143) even after a clean shutdown;
# tini -e 143 reports that as exit code 0. Any other code (2: bad bundle, 1: crash) passes through.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-e", "143", "--"]
CMD ["python", "-m", "service"]
