# detr-serve image: `docker build -t detr-serve:cpu .` (CPU torch, the default) or
# `docker build --build-arg TORCH_VARIANT=cuda -t detr-serve:cuda .` (CUDA torch + the gpu extra).
# The embedded default model (models/rtdetr-shapes) is baked in; mount your own under /models
# and point DETR_SERVE_MODEL at it.

FROM python:3.11-slim AS build

# cpu: torch from the PyTorch CPU index (no multi-GB CUDA libraries);
# cuda: torch from PyPI, whose Linux wheels bundle CUDA, plus the `gpu` extra.
ARG TORCH_VARIANT=cpu
# Keep in step with TORCH_CPU in the Makefile (tests/unit/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in a layer of its own (the slow one), then the package: the same order as
# `make install`, so pip keeps the chosen torch build when it resolves the package.
RUN case "$TORCH_VARIANT" in \
        cpu) pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION" ;; \
        cuda) pip install --no-cache-dir "torch==$TORCH_VERSION" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
# The extras are the Makefile's minus `dev`: the Makefile installs '.[dev,onnx]' without CUDA
# and '.[dev,gpu]' with it; the image installs './[onnx]' and './[gpu]' (checked by
# tests/unit/test_deploy_files.py). Not editable: the image carries no source tree.
RUN extras='[onnx]'; \
    if [ "$TORCH_VARIANT" = cuda ]; then extras='[gpu]'; fi; \
    pip install --no-cache-dir "./$extras"


FROM python:3.11-slim AS runtime

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
