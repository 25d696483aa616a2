#!/usr/bin/env bash
# Download, here (where pip reaches a package index), the wheels the GPU machine's image lacks,
# into .whl/ (git-ignored), for scripts/gpu_check.sh to install there (the device tool carries
# .whl: run(..., carry=[".whl"])).
#
# The GPU image has Python 3.12, torch 2.11, torchvision 0.26, transformers 5.17, triton 3.6,
# onnxruntime (CPU), aiohttp, uvloop, httpx, prometheus-client, pillow, numpy, scipy, pytest; it
# lacks FastAPI, uvicorn, pydantic and the rest below. Versions are this checkout's .venv's, so
# the server runs the same web stack on both sides.
#
# transformers is NOT carried: 5.24 (this checkout) needs newer huggingface-hub, tokenizers and
# safetensors, binary wheels that would replace the image's own. The code that depends on
# transformers' internals (app/backends/capture_guard.py: the `spatial_shapes[level, 0] = height`
# writes and `torch_compilable_check` in RT-DETR, RT-DETRv2, D-FINE) was read in both 5.17 and
# 5.24, where those lines are the same; tests/unit/test_cuda_graphs.py, in gpu_check.sh's list,
# checks it under the image's 5.17.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAMES=(fastapi starlette uvicorn click h11 pydantic pydantic_core pydantic-settings python-dotenv
       annotated-types typing-inspection python-multipart httptools annotated-doc
       opentelemetry-api typing_extensions hypothesis sortedcontainers)
pins=$("$PY" - "${NAMES[@]}" <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
PYEOF
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $pins
ls -1 .whl
du -sh .whl
