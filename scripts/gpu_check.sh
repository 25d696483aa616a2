#!/usr/bin/env bash
# The GPU fast path's checks in one run on a CUDA machine, most important figures first, within
# GPU_CHECK_BUDGET_S (default 360 s; with the machine's start-up that leaves room in a 15-minute
# lease for a second, shorter run, e.g. GPU_CHECK_BUDGET_S=200):
#   r18         RT-DETR-R18-sized model (640, random weights, float16): the forward pass with and
#               without CUDA graphs at batch 1..64, the engine's whole batch (pixels, nvjpeg),
#               then HTTP at 1/16/64/256 clients against detr-serve and a naive endpoint
#   kernel      tests/unit/test_msda_op.py: the Triton deformable-attention kernel against the
#               reference, on the GPU
#   cuda_tests  tests/cuda (capture of RT-DETR/v2/D-FINE, replays x4,y2,z4, padded rows, 30 mixed
#               batches on two workers, nvjpeg, float16) and the fast path's unit tests
#   r50         the R50-sized model, raw and HTTP (no naive baseline), if there is time
#   compile     raw R18 under torch.compile, if there is time
# Each step has its own time limit, cut to what is left. After each step $OUT/check.json (steps:
# status, seconds, reason) and $OUT/summary.txt (one screen) are rewritten, so a run cut short
# keeps what it measured. Logs: $OUT/<step>.log; figures: $OUT/r18.json, r50.json, compile.json;
# test results: $OUT/kernel.xml, tests.xml.
#
# Before, where pip reaches an index: scripts/fetch_gpu_wheels.sh (FastAPI & co. into .whl/).
# With the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Dry run, on any machine: bash scripts/gpu_check.sh --dry-run (or GPU_CHECK_DRY_RUN=1): every
# step's command runs, on the CPU at tiny sizes (bench --dry-run) or as pytest --collect-only,
# and steps that need CUDA say so in check.json; it checks the wiring, it measures nothing.
# Knobs: GPU_CHECK_BUDGET_S, PY (python3), OUT (./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET_S:-240}; else BUDGET=${GPU_CHECK_BUDGET_S:-360}; fi
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
rm -f "$OUT/check.json"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
REPORT=(scripts/gpu_check_report.py --out "$OUT")
left() { echo $((BUDGET - ($(date +%s) - START))); }

# -- packages the image lacks (FastAPI, uvicorn, pydantic...), from the carried wheels --------
WHEELS_NOTE=""
if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, multipart, hypothesis" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/detr-site .whl/*.whl || WHEELS_NOTE="installing .whl/ failed"
    export PYTHONPATH=/tmp/detr-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    WHEELS_NOTE="FastAPI & co. missing and no .whl/: HTTP steps will fail (scripts/fetch_gpu_wheels.sh)"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'PYEOF'
import importlib
import platform
print("python", platform.python_version())
for name in ("torch", "torchvision", "transformers", "triton", "fastapi", "uvicorn", "aiohttp"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
PYEOF
  [ -n "$WHEELS_NOTE" ] && echo "$WHEELS_NOTE"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" != 1 ] && [ "$DRY" != 1 ]; then
  echo "no CUDA device here: run with --dry-run to check the wiring" | tee "$OUT/summary.txt"
  exit 2
fi

# step NAME MAX_SECONDS CUDA_REASON COMMAND...: run COMMAND under the smaller of MAX_SECONDS
# and the time left; record it. CUDA_REASON (empty if none) is recorded for a dry run.
step() {
  local name=$1 max=$2 reason=$3
  shift 3
  local budget
  budget=$(( $(left) - 15 ))  # the summary's share
  [ "$budget" -gt "$max" ] && budget=$max
  if [ "$budget" -lt 20 ]; then
    echo "== $name: skipped, ${budget} s left"
    "$PY" "${REPORT[@]}" --record "$name" skipped 0 0 "out of time (${budget} s left)"
    return
  fi
  echo "== $name ($(left) s left, limit ${budget} s): $*"
  local started=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]} status=ok
  [ "$rc" != 0 ] && status=failed
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status=timeout
  [ "$DRY" = 1 ] && [ -n "$reason" ] && [ "$rc" = 0 ] && status=dry-run
  "$PY" "${REPORT[@]}" --record "$name" "$status" "$rc" $(( $(date +%s) - started )) "$reason"
  "$PY" "${REPORT[@]}" --summary >/dev/null
}

BENCH=("$PY" scripts/bench/bench.py --device cuda --dtype float16)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -W ignore::DeprecationWarning)
NEEDS=""
if [ "$DRY" = 1 ]; then
  BENCH+=(--dry-run)
  PYTEST+=(--collect-only)
  NEEDS="needs CUDA: ran on the CPU at tiny sizes (--dry-run), no figures"
  TESTS_NEED="needs CUDA: collected only (imports and parametrisation checked)"
else
  TESTS_NEED=""
fi

step r18 200 "$NEEDS" "${BENCH[@]}" --models r18 --max-batch 64 --clients 1,16,64,256 \
  --duration 3 --raw-seconds 0.5 --out "$OUT/r18.json"
step kernel 90 "$TESTS_NEED" "${PYTEST[@]}" --junitxml="$OUT/kernel.xml" tests/unit/test_msda_op.py
step cuda_tests 180 "$TESTS_NEED" "${PYTEST[@]}" --junitxml="$OUT/tests.xml" \
  tests/cuda tests/unit/test_cuda_graphs.py tests/unit/test_padded_rows.py \
  tests/unit/test_device_jpeg.py tests/unit/test_precision.py tests/unit/test_engine_pipeline.py \
  tests/unit/test_engine_setup.py tests/unit/test_buckets.py tests/unit/test_engine_pool.py
# A dry run has checked the HTTP path with r18: here the command line and the raw part.
if [ "$DRY" = 1 ]; then R50_EXTRA=(--skip-http --max-batch 1); else R50_EXTRA=(); fi
step r50 150 "$NEEDS" "${BENCH[@]}" --models r50 --skip-naive --clients 1,64,256 --max-batch 64 \
  --duration 3 --raw-seconds 0.5 --out "$OUT/r50.json" "${R50_EXTRA[@]}"
step compile 300 "$NEEDS" "${BENCH[@]}" --models r18 --skip-http --torch-compile --max-batch 32 \
  --raw-seconds 0.5 --out "$OUT/compile.json"

"$PY" "${REPORT[@]}" --summary
