# codex-ml in a container (docs/deploy.md). CPU by default:
#   docker build -t codex-ml .
# CUDA: a CUDA base image and PyTorch's CUDA wheels, by build argument:
#   docker build -t codex-ml:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the locked dependencies and the codex-ml wheel
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# CUDA base images come without Python: take the distribution's
# hadolint ignore=DL3008
RUN command -v python3 >/dev/null || { apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*; }
WORKDIR /src
RUN python3 -m venv /opt/codex-ml
ENV PATH=/opt/codex-ml/bin:$PATH
COPY requirements.lock ./
# torch first from its own index (the CPU or the CUDA build), then exactly the lock file's other versions
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX" \
 && grep -v '^torch==' requirements.lock > requirements.docker \
 && pip install --no-cache-dir -r requirements.docker
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps -w /wheels . \
 && pip install --no-cache-dir --no-deps /wheels/*.whl

# ---- runtime: the virtualenv, bubblewrap for the HumanEval sandbox, an unprivileged user
FROM ${BASE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap ca-certificates \
 && { command -v python3 >/dev/null || apt-get install -y --no-install-recommends python3; } \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 codex
COPY --from=build /opt/codex-ml /opt/codex-ml
ENV PATH=/opt/codex-ml/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/codex/work
VOLUME ["/home/codex/work/runs"]
EXPOSE 8000
# `codex-ml serve` answers /health without a key (serve.port=8000 inside the container)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["codex-ml"]
CMD ["--help"]
