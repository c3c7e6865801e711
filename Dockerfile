# syntax=docker/dockerfile:1
# One image for every Speculum role; the container command picks the role:
#   python -m vision_encoder.server --target DIR    python -m verify_service.server --target DIR
#   python -m draft_service.server --target DIR --drafter ngram|DIR    python -m orchestrator.serve_main
# Image name (k8s/*.yaml use exactly this; tests/test_manifests.py checks it): speculum:0.1.0
#   docker build -t speculum:0.1.0 .                            # CPU torch (default)
#   docker build -t speculum:0.1.0 --build-arg VARIANT=cuda .   # CUDA torch, for the GPU cluster
# The CUDA variant needs no CUDA base image: PyPI's torch==2.13.0 wheels bring the CUDA runtime as
# nvidia-* wheels, and the node's driver is mounted by the NVIDIA container toolkit / device plugin.
ARG VARIANT=cpu

FROM python:3.11.7-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch==2.13.0 must be pinned: unpinned, pip resolves a newer multi-GB CUDA build (notes/stack.md §1).
FROM python-base AS torch-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM python-base AS torch-cuda
ENV TORCH_INDEX_URL=https://pypi.org/simple \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# --- build: a venv with torch, the pinned dependencies, generated stubs and the project ---
FROM torch-${VARIANT} AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY speculum ./speculum
COPY vision_encoder ./vision_encoder
COPY verify_service ./verify_service
COPY draft_service ./draft_service
COPY orchestrator ./orchestrator
COPY bench ./bench
COPY demo_world ./demo_world
# Dependencies come from pyproject.toml (exact pins); torch==2.13.0 is already satisfied above.
RUN pip install .
# Stubs are generated from protos/, never committed: generate into the source tree, then reinstall
# the project so that speculum/v1 is part of the installed package.
RUN python -m speculum.stubs && pip install --no-deps --force-reinstall . \
    && cd / && python -c "import speculum.v1.speculum_pb2_grpc, orchestrator.serve_main"

# --- runtime: the venv and the demo model pair, nothing else ---
FROM torch-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="speculum" \
      org.opencontainers.image.version="0.1.0" \
      io.speculum.image="speculum:0.1.0" \
      io.speculum.variant="${VARIANT}"
RUN groupadd --gid 10001 speculum \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin speculum
COPY --from=build /opt/venv /opt/venv
COPY models/demo /opt/speculum/models/demo
# No network and a read-only root at run time: caches go to /tmp (an emptyDir in k8s).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    SPECULUM_MODELS_DIR=/opt/speculum/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    TOKENIZERS_PARALLELISM=false
WORKDIR /opt/speculum
USER 10001:10001
EXPOSE 50051 8000 50061 50062 50063
CMD ["python", "-m", "orchestrator.serve_main"]
