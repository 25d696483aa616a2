# detr-serve image: `docker build -t detr-serve:cpu .` (CPU torch, the default) or
# `docker build --build-arg TORCH_VARIANT=cuda -t detr-serve:cuda .` (CUDA torch + the gpu extra).
# The embedded default model (models/rtdetr-shapes) is baked in; mount your own under /models
# and point DETR_SERVE_MODEL at it. Needs BuildKit (DOCKER_BUILDKIT=1 with a Docker 20.10 CLI,
# the default with buildx) for the RUN --mount lines.
#
# Build arguments for machines without Docker Hub or the PyTorch index (README "Deployment";
# `make test-docker` uses all three):
#   BASE_IMAGE               another image with Python 3.11 (python3 -m venv must work), e.g. one
#                            imported from Debian's packages with mmdebstrap
#   TORCH_FROM_WHEELHOUSE=1  install torch from its wheel in ./wheelhouse (its dependencies
#                            from PyPI): `pip download --no-deps torch==2.13.0 -d wheelhouse/`
#   --secret id=ca,src=FILE  a CA bundle for pip behind a TLS-intercepting proxy; mounted for the
#                            pip steps only, never stored in a layer

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build

# cpu: torch from the PyTorch CPU index (no multi-GB CUDA libraries);
# cuda: torch from PyPI, whose Linux wheels bundle CUDA, plus the `gpu` extra.
ARG TORCH_VARIANT=cpu
# Keep in step with TORCH_CPU in the Makefile (tests/unit/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FROM_WHEELHOUSE=0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# python3: the official image also has `python`, an image made from Debian's packages only python3.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in a layer of its own (the slow one), then the package: the same order as
# `make install`, so pip keeps the chosen torch build when it resolves the package.
# The wheelhouse/ folder is bound, not copied: the wheel stays out of every layer, and this
# step's cache depends on that folder only. (DL3013: the wheel's file name pins the version.)
# hadolint ignore=DL3013
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "$TORCH_FROM_WHEELHOUSE" = 1 ]; then \
        set -- /wheelhouse/torch-"$TORCH_VERSION"[+-]*.whl; \
        [ -f "$1" ] || { echo "no torch $TORCH_VERSION wheel in wheelhouse/" >&2; exit 1; }; \
        pip install --no-cache-dir "$1"; \
    else case "$TORCH_VARIANT" in \
        cpu) pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION" ;; \
        cuda) pip install --no-cache-dir "torch==$TORCH_VERSION" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac; fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
# The extras are the Makefile's minus `dev`: the Makefile installs '.[dev,onnx]' without CUDA
# and '.[dev,gpu]' with it; the image installs './[onnx]' and './[gpu]' (checked by
# tests/unit/test_deploy_files.py). Not editable: the image carries no source tree.
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    extras='[onnx]'; \
    if [ "$TORCH_VARIANT" = cuda ]; then extras='[gpu]'; fi; \
    pip install --no-cache-dir "./$extras"

# The default model's ONNX exports, made once here so that a container starts without exporting
# (--backend auto serves an up-to-date model.onnx from the model folder): float32, and the INT8
# model that --precision int8 serves (calibrated on generated images:
# scripts/training/synthetic_shapes.py).
COPY scripts/__init__.py scripts/export_onnx.py scripts/
COPY scripts/training/__init__.py scripts/training/synthetic_shapes.py scripts/training/
COPY models/rtdetr-shapes/ models/rtdetr-shapes/
RUN python scripts/export_onnx.py models/rtdetr-shapes --int8


FROM ${BASE_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DETR_SERVE_HOST=0.0.0.0 \
    DETR_SERVE_PORT=8000 \
    DETR_SERVE_GRPC_PORT=8001 \
    DETR_SERVE_MODEL=/opt/detr-serve/models/rtdetr-shapes

RUN groupadd --system --gid 10001 detr && \
    useradd --system --uid 10001 --gid detr --create-home --home-dir /home/detr detr && \
    mkdir /models && chown detr:detr /models

COPY --from=build /opt/venv /opt/venv
COPY models/ /opt/detr-serve/models/
COPY --from=build /src/models/rtdetr-shapes/model.onnx /src/models/rtdetr-shapes/model.int8.onnx \
     /opt/detr-serve/models/rtdetr-shapes/

# Users' checkpoints: mount a folder here, e.g. DETR_SERVE_MODEL=/models/my-detector.
VOLUME ["/models"]

USER 10001:10001
WORKDIR /home/detr
# HTTP, and KServe v2 gRPC (Triton's ports).
EXPOSE 8000 8001

# /readyz is 200 only once the model is warm, and 503 again while draining on SIGTERM.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DETR_SERVE_PORT', '8000') + '/readyz', timeout=2)"]

ENTRYPOINT ["detr-serve"]
