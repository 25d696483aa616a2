#!/usr/bin/env bash
# The GPU fast path's checks, in one run on a CUDA machine (about 8 minutes on an H100):
#   1. the CUDA tests (tests/cuda: graphs vs eager, nvjpeg vs Pillow, float16 vs float32, the
#      whole fast path, pipelined streams) and the fast path's unit tests under that torch;
#   2. scripts/bench.py --device cuda: RT-DETR-R18 and -R50 sized models, raw with and without
#      CUDA graphs, HTTP at 1/16/64/256 clients against detr-serve and a naive endpoint;
#   3. with the time left, the raw R18 pass under torch.compile as well.
# Results go to $OUT (or ./gpu-check-out): env.txt, tests.log, tests.xml, bench.log,
# bench_cuda.json, compile.log, bench_compile.json, summary.txt.
#
# Before, where pip reaches PyPI: scripts/fetch_gpu_wheels.sh (writes .whl/, git-ignored).
# With the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Knobs: GPU_CHECK_BUDGET_S (480), BENCH_MODELS (r18,r50), BENCH_DURATION (5 s per load step).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
left() { echo $((BUDGET - ($(date +%s) - START))); }

# -- packages the image lacks (FastAPI, uvicorn, pydantic...), from the carried wheels --------
if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, multipart" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing FastAPI & co. and no .whl/: run scripts/fetch_gpu_wheels.sh where pip works" \
      | tee "$OUT/summary.txt"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'PYEOF'
import importlib
for name in ("torch", "torchvision", "transformers", "triton", "fastapi", "uvicorn", "aiohttp"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
PYEOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- 1. tests ----------------------------------------------------------------------------------
echo "== tests ($(left) s left)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/tests.xml" \
  tests/cuda tests/unit/test_buckets.py tests/unit/test_engine_pipeline.py \
  tests/unit/test_engine_pool.py tests/unit/test_device_jpeg.py tests/unit/test_precision.py \
  tests/unit/test_engine_setup.py tests/unit/test_engine.py 2>&1 | tee "$OUT/tests.log"
TESTS_RC=${PIPESTATUS[0]}

# -- 2. benchmark ------------------------------------------------------------------------------
BENCH_S=$(( $(left) - 20 ))
echo "== bench ($(left) s left, giving it ${BENCH_S} s)"
timeout "$BENCH_S" "$PY" scripts/bench.py --device cuda --models "${BENCH_MODELS:-r18,r50}" \
  --duration "${BENCH_DURATION:-5}" --raw-seconds 0.6 --out "$OUT/bench_cuda.json" \
  2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

# -- 3. torch.compile, raw only, if there is time -----------------------------------------------
COMPILE_RC=skipped
if [ "$(left)" -gt 120 ]; then
  echo "== torch.compile raw R18 ($(left) s left)"
  timeout $(( $(left) - 10 )) "$PY" scripts/bench.py --device cuda --models r18 --skip-http \
    --torch-compile --max-batch 32 --raw-seconds 0.6 --out "$OUT/bench_compile.json" \
    2>&1 | tee "$OUT/compile.log"
  COMPILE_RC=${PIPESTATUS[0]}
fi

# -- summary -----------------------------------------------------------------------------------
{
  echo "tests rc=$TESTS_RC bench rc=$BENCH_RC compile rc=$COMPILE_RC, $(( $(date +%s) - START )) s"
  tail -n 3 "$OUT/tests.log"
  "$PY" - "$OUT/bench_cuda.json" <<'PYEOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no benchmark figures: {exc}")
print(report["device"], "torch", report["torch"])
for name, entry in report["models"].items():
    raw = entry["raw"]
    print(f"{name}: {raw['dtype']}, graphs {raw['graphs']}, nvjpeg {raw['nvjpeg']}, "
          f"engine start-up {raw['startup_s']:.1f} s")
    print("  targets:", json.dumps(entry["targets"]))
PYEOF
} 2>&1 | tee "$OUT/summary.txt"
