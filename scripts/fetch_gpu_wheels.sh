#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels the GPU machine's image lacks, into .whl/
# (git-ignored), for scripts/gpu_check.sh to install there (the device tool carries .whl).
# The GPU image has Python 3.12, torch, torchvision, transformers, aiohttp, uvloop, httpx,
# prometheus-client, pillow, numpy, scipy, pytest; it lacks FastAPI, uvicorn, pydantic and the
# rest below. Versions are the ones of this checkout's .venv, so both run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAMES=(fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv
       annotated-types typing-inspection python-multipart httptools annotated-doc
       typing_extensions)
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
