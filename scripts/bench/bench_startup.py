"""Start-up time of detr-serve, from launch to /readyz 200: torch, and the default backend (auto:
onnxruntime on the CPU) with its export cache cold (exports first) and warm (reuses it).

    python scripts/bench/bench_startup.py                       # default model, 3 rounds
    python scripts/bench/bench_startup.py --model DIR --rounds 5

Each round starts, in a rotated order, --backend torch, auto with an empty cache folder, and auto
again on the cache the cold start filled. It prints each time, then per round the ratio
warm-auto / torch (target <= 1.2: a second start with a cached export is about as quick as
torch's) and the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench.serverproc import RunningServer  # noqa: E402

TARGET = 1.2


def started_in(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    server = RunningServer(args, env=env, ready_timeout_s=600)
    seconds = time.perf_counter() - t0
    try:
        import httpx

        card = httpx.get(server.url + "/v1/models").json()["models"][0]
        return seconds, f"{card['backend']} ({card.get('backend_reason', '')})"
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "rtdetr-shapes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    base = ["--model", str(args.model), "--log-level", "warning"]
    ratios = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="detr-onnx-cache-") as cache:
            env = {"DETR_SERVE_ONNX_CACHE_DIR": cache}
            runs = {}
            # The cold start fills the cache the warm one reads: it always goes first of the two.
            order = (["torch", "auto-cold", "auto-warm"], ["auto-cold", "auto-warm", "torch"])[
                r % 2
            ]
            for name in order:
                backend = "torch" if name == "torch" else "auto"
                runs[name], what = started_in([*base, "--backend", backend], env)
                print(f"round {r + 1}: {name:9s} ready in {runs[name]:6.2f} s  {what}", flush=True)
        ratio = runs["auto-warm"] / runs["torch"]
        ratios.append(ratio)
        print(
            f"round {r + 1}: auto (cached export) / torch start-up = {ratio:.2f} "
            f"(target <= {TARGET}); the first export cost "
            f"{runs['auto-cold'] - runs['auto-warm']:.1f} s",
            flush=True,
        )
    print(
        f"median over {args.rounds} rounds: auto (cached) / torch = {statistics.median(ratios):.2f}"
        f" (range {min(ratios):.2f} .. {max(ratios):.2f}; target <= {TARGET})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
