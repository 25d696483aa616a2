"""Soak test: overload a real detr-serve on loopback and check that it stays correct.

    python scripts/loadtest.py --minutes 3            # default model, 2x measured capacity

1. Boots `detr-serve` (or uses --url, which must be on loopback) with a small queue.
2. Measures capacity: closed-loop Locust load for --calibrate-s seconds -> requests/s.
3. Soaks at --overload x that rate (open-loop arrivals from many Locust users, each with a
   constant throughput) for --minutes, recording every response's status.
4. Reports: requests sent, accepted (not 429/503) and answered with 200, the 429 share and
   whether each 429 carried Retry-After, 5xx count, lost requests (no response), RSS of the
   server at start and end, p50/p99 latency of accepted requests. Exits 1 when a rule breaks:
   accepted != answered, any 5xx, a 429 without Retry-After, or RSS growth over --max-rss-growth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR  # noqa: E402
from scripts.bench import run_locust, run_locust_headless, sample_jpeg  # noqa: E402
from scripts.serverproc import RunningServer  # noqa: E402

LOCUSTFILE = ROOT / "scripts" / "loadtest_locustfile.py"


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def soak(url: str, rate: float, users: int, seconds: float, image: Path, out: Path) -> dict:
    env = {
        "DETR_BENCH_IMAGE": str(image),
        "DETR_LOAD_RATE_PER_USER": str(rate / users),
        "DETR_LOAD_RESULTS": str(out),
    }
    run_locust_headless(LOCUSTFILE, url, users, seconds, env, "--stop-timeout", "60")
    return dict(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO_MODELS_DIR / DEFAULT_MODEL_NAME)
    parser.add_argument("--url", default=None, help="an already running server (loopback only)")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--overload", type=float, default=2.0, help="x measured capacity")
    parser.add_argument("--calibrate-s", type=float, default=15.0)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--queue", type=int, default=32, help="server max queue size")
    parser.add_argument("--max-rss-growth", type=float, default=1.5, help="end/start RSS limit")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="detr-soak-"))
    image = args.image or workdir / "image.jpg"
    if args.image is None:
        image.write_bytes(sample_jpeg(None))
    server = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must point at loopback: load is only ever sent to this machine")
        url, pid = args.url, None
    else:
        server = RunningServer(
            [
                "--model",
                str(args.model),
                "--max-queue-size",
                str(args.queue),
                "--log-level",
                "warning",
            ]
        )
        url, pid = server.url, server.proc.pid
    try:
        capacity = run_locust(url, 8, args.calibrate_s, image, workdir)["img_s"]
        target = capacity * args.overload
        print(
            f"capacity {capacity:.1f} req/s; soaking at {target:.1f} req/s for "
            f"{args.minutes:g} min",
            flush=True,
        )
        rss_start = rss_mb(pid) if pid else float("nan")
        report = soak(url, target, args.users, args.minutes * 60, image, workdir / "soak.json")
        rss_end = rss_mb(pid) if pid else float("nan")
    finally:
        if server is not None:
            time.sleep(1)
            server.stop()
    report.update(
        capacity_req_s=capacity, target_req_s=target, rss_start_mb=rss_start, rss_end_mb=rss_end
    )
    print(json.dumps(report, indent=2))
    problems = []
    if report["accepted"] != report["answered"]:
        problems.append("accepted != answered")
    if report["server_errors"]:
        problems.append(f"{report['server_errors']} responses were 5xx")
    if report["rejected_without_retry_after"]:
        problems.append("a 429 came without Retry-After")
    if report["lost"]:
        problems.append(f"{report['lost']} requests got no response")
    if pid and rss_end > rss_start * args.max_rss_growth:
        problems.append(f"RSS grew from {rss_start:.0f} to {rss_end:.0f} MB")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
