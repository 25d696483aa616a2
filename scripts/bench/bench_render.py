"""Benchmark: what drawing costs, and that a 40-megapixel render does not hold the service.

    python scripts/bench/bench_render.py                 # default model, 3 rounds
    python scripts/bench/bench_render.py --rounds 5 --out render.json

Boots the real `detr-serve` (default model) on a free port, then measures, all in one run:
1. /v1/detect and /v1/render of examples/shapes-640x480.jpg, sequential, median latency
   (the render/detect ratio is what drawing adds at that size);
2. a 40 MP (7296x5472) JPEG through /v1/render: its time and its answer's size;
3. while that render runs: small /v1/detect requests and /healthz, one after the other, their
   median latency against the same requests on the idle server (ratios), and how many of them
   were answered before the large render finished.
Timings here are for comparing within a run; the machine's load moves them all.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.serverproc import RunningServer  # noqa: E402

EXAMPLE = ROOT / "examples" / "shapes-640x480.jpg"
LARGE_SIZE = (7296, 5472)  # 39.9 MP, a 40 MP camera's frame


def _large_jpeg() -> bytes:
    """The example scaled to 40 MP: real edges for the JPEG coder, shapes for the model."""
    img = Image.open(EXAMPLE).convert("RGB").resize(LARGE_SIZE, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _post(
    client: httpx.Client, path: str, data: bytes, **form: str
) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    r = client.post(path, files={"file": ("image.jpg", data, "image/jpeg")}, data=form)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise SystemExit(f"{path} answered {r.status_code}: {r.text[:300]}")
    return elapsed, r


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    small = EXAMPLE.read_bytes()
    large = _large_jpeg()
    server = RunningServer([], env={"DETR_SERVE_TORCH_THREADS": "1"})
    report: dict[str, object] = {}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            _post(client, "/v1/render", small)  # warm both paths
            detect = [_post(client, "/v1/detect", small)[0] for _ in range(args.rounds * 3)]
            render = [_post(client, "/v1/render", small)[0] for _ in range(args.rounds * 3)]
            health = []
            for _ in range(args.rounds * 3):
                started = time.perf_counter()
                client.get("/healthz")
                health.append(time.perf_counter() - started)
            report["small_detect_ms"] = _median_ms(detect)
            report["small_render_ms"] = _median_ms(render)
            report["render_over_detect"] = round(
                statistics.median(render) / statistics.median(detect), 2
            )

            large_s: list[float] = []
            during_detect: list[float] = []
            during_health: list[float] = []
            answered_during = 0
            for _ in range(args.rounds):
                done = threading.Event()
                result: dict[str, object] = {}

                def big(result: dict[str, object] = result, done: threading.Event = done) -> None:
                    with httpx.Client(base_url=server.url, timeout=120) as other:
                        elapsed, r = _post(other, "/v1/render", large)
                    result["s"], result["bytes"] = elapsed, len(r.content)
                    result["size"] = Image.open(io.BytesIO(r.content)).size
                    done.set()

                worker = threading.Thread(target=big)
                worker.start()
                time.sleep(0.3)  # let it reach the drawing
                while not done.is_set():
                    elapsed, _ = _post(client, "/v1/detect", small)
                    if not done.is_set():
                        answered_during += 1
                        during_detect.append(elapsed)
                    started = time.perf_counter()
                    client.get("/healthz")
                    if not done.is_set():
                        during_health.append(time.perf_counter() - started)
                worker.join()
                large_s.append(float(result["s"]))  # type: ignore[arg-type]
                report["large_answer"] = {"size": result["size"], "bytes": result["bytes"]}
            report["large_render_ms"] = _median_ms(large_s)
            report["small_detects_answered_during_large_renders"] = answered_during
            if during_detect:
                report["small_detect_during_large_ms"] = _median_ms(during_detect)
                report["small_detect_slowdown"] = round(
                    statistics.median(during_detect) / statistics.median(detect), 2
                )
            if during_health:
                report["healthz_idle_ms"] = _median_ms(health)
                report["healthz_during_large_ms"] = _median_ms(during_health)
    finally:
        server.stop()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
