"""Jobs (issue 15) on a real server, in one run: online /v1/detect latency without a job and
while a gigapixel job runs (the low-priority lane's promise: p50 within 1.5x), then the job's
own figures (tiles/s, wall time, CPU time per tile, the process tree's peak RSS growth, recall).

    python -m scripts.bench.bench_jobs --size 20000          # the issue's 20k x 20k proof
    python -m scripts.bench.bench_jobs --size 6000 --online 100

The TIFF is written first (tiled 256 px, zlib, 3 levels; scripts/training/gigapixel_tiff.py) into a
temporary folder, with the server's job store. Online requests are one client, one 640x480
JPEG at a time (the latency a lone user sees), paced with a short pause between requests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from scripts.bench.serverproc import RunningServer
from scripts.training.gigapixel_tiff import recall, write

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-640x480.jpg"


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def online_latencies(url: str, count: int, stop: threading.Event | None = None) -> list[float]:
    image = EXAMPLE.read_bytes()
    out = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            r = client.post(url + "/v1/detect", files={"file": ("a.jpg", image, "image/jpeg")})
            out.append(time.perf_counter() - started)
            r.raise_for_status()
            time.sleep(0.05)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--online", type=int, default=60, help="online requests per phase")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server-arg", action="append", default=[], help="extra detr-serve flag")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        folder = Path(tmp)
        slide = folder / "slide.tif"
        started = time.perf_counter()
        planted = write(slide, args.size, args.size, levels=3)
        print(
            f"TIFF {args.size} x {args.size}: {slide.stat().st_size / 1e6:.0f} MB, "
            f"{len(planted.labels)} shapes, written in {time.perf_counter() - started:.0f} s"
        )
        srv = RunningServer(
            ["--workers", str(args.workers), "--jobs-dir", str(folder / "jobs"), *args.server_arg]
        )
        try:
            online_latencies(srv.url, 10)  # warm
            idle = online_latencies(srv.url, args.online)
            rss_before = tree_rss(srv.proc.pid)
            cpu_before = tree_cpu(srv.proc.pid)
            with slide.open("rb") as fh:
                r = httpx.post(srv.url + "/v1/jobs", files={"file": ("s.tif", fh)}, timeout=600)
            r.raise_for_status()
            job_id = r.json()["id"]
            t0 = time.perf_counter()
            while httpx.get(f"{srv.url}/v1/jobs/{job_id}").json()["progress"]["tiles_done"] == 0:
                time.sleep(0.1)
            busy = online_latencies(srv.url, args.online)
            peak = rss_before
            while True:
                job = httpx.get(f"{srv.url}/v1/jobs/{job_id}", timeout=60).json()
                peak = max(peak, tree_rss(srv.proc.pid))
                if job["status"] not in ("queued", "running"):
                    break
                time.sleep(0.5)
            wall = time.perf_counter() - t0
            cpu = tree_cpu(srv.proc.pid) - cpu_before
            assert job["status"] == "succeeded", job
            lines = httpx.get(f"{srv.url}/v1/jobs/{job_id}/results", timeout=600).text
            import json

            detections = [json.loads(x) for x in lines.splitlines()[1:]]
        finally:
            srv.stop()
    p50_idle, p50_busy = statistics.median(idle), statistics.median(busy)
    tiles = job["progress"]["tiles_total"]
    print(f"online p50 without a job: {p50_idle * 1e3:.1f} ms ({len(idle)} requests)")
    print(f"online p50 during the job: {p50_busy * 1e3:.1f} ms ({len(busy)} requests)")
    print(f"ratio: {p50_busy / p50_idle:.2f} (target <= 1.5)")
    print(
        f"job: {tiles} tiles in {wall:.0f} s ({tiles / wall:.1f} tiles/s, the online phase "
        f"included), server CPU {cpu / tiles * 1e3:.0f} ms per tile"
    )
    print(f"peak RSS growth of the process tree: {(peak - rss_before) / 2**20:.0f} MB")
    print(
        f"detections {len(detections)}, recall on {len(planted.labels)} planted shapes: "
        f"{recall(planted.boxes, planted.labels, detections):.3f}"
    )


if __name__ == "__main__":
    main()
