"""Closed-loop HTTP load: N clients, each uploading one JPEG after another, spread over worker
processes so that the load generator is not what saturates.

    python scripts/bench/httpload.py URL/v1/detect --clients 64 --seconds 10 --image IMG.jpg

Each client sends multipart/form-data (`file` = the image, `threshold` = 0.5), or with --json
{"images": [{"data": base64}], "threshold": 0.5}, and waits for the answer before sending
again. Requests that start in the warm-up second(s) are not counted.
Written by hand (aiohttp, multiprocessing) because Locust's single process tops out at a few
thousand requests per second, below what a GPU serves.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    clients: int
    seconds: float
    requests: int
    failures: int
    img_s: float
    p50_ms: float
    p99_ms: float
    completed: int = 0  # answered with 200 over the whole run, warm-up included (CPU / image)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def json_body(image: bytes) -> bytes:
    data = base64.b64encode(image).decode()
    return json.dumps({"images": [{"data": data}], "threshold": 0.5}).encode()


async def _client_loop(
    session: object, url: str, image: bytes, start: float, stop: float, out: list, as_json: bool
) -> None:
    import aiohttp

    assert isinstance(session, aiohttp.ClientSession)
    body = json_body(image) if as_json else b""
    while (began := time.monotonic()) < stop:
        if as_json:
            request = session.post(url, data=body, headers={"Content-Type": "application/json"})
        else:
            form = aiohttp.FormData()
            form.add_field("file", image, filename="image.jpg", content_type="image/jpeg")
            form.add_field("threshold", "0.5")
            request = session.post(url, data=form)
        ok = False
        try:
            async with request as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        ended = time.monotonic()
        if began >= start and ended <= stop:
            out.append((ended - began, ok))
        elif ok:
            out.append((None, ok))  # outside the window: counted for CPU per image only


async def _worker_async(
    url: str, image: bytes, clients: int, start: float, stop: float, as_json: bool
) -> list:
    import aiohttp

    out: list = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            *(_client_loop(session, url, image, start, stop, out, as_json) for _ in range(clients))
        )
    return out


def _worker(args: tuple[str, bytes, int, float, float, bool]) -> list:
    url, image, clients, start_wall, stop_wall, as_json = args
    # monotonic clocks are per process in principle: hand over wall times, convert here.
    now_wall, now_mono = time.time(), time.monotonic()
    start, stop = now_mono + start_wall - now_wall, now_mono + stop_wall - now_wall
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_worker_async(url, image, clients, start, stop, as_json))


def run_load(
    url: str,
    image: bytes,
    clients: int,
    seconds: float,
    warmup_s: float = 2.0,
    procs: int = 0,
    as_json: bool = False,
) -> LoadResult:
    """Closed-loop load for warmup_s + seconds; figures from the measured `seconds` only."""
    procs = procs or min(clients, max(1, (multiprocessing.cpu_count() or 2) // 2), 8)
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start = time.time() + 1.0 + warmup_s  # a second for the workers to start
    stop = start + seconds
    jobs = [(url, image, n, start, stop, as_json) for n in shares if n]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(jobs)) as pool:
        parts = pool.map(_worker, jobs)
    everything = [s for part in parts for s in part]
    samples = [s for s in everything if s[0] is not None]
    latencies = np.array([lat for lat, ok in samples if ok]) * 1e3
    failures = sum(1 for _, ok in samples if not ok)
    done = len(latencies)
    return LoadResult(
        clients=clients,
        seconds=seconds,
        requests=done + failures,
        failures=failures,
        img_s=done / seconds,
        p50_ms=float(np.percentile(latencies, 50)) if done else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if done else float("nan"),
        completed=sum(1 for _, ok in everything if ok),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=0, help="worker processes (0: auto)")
    parser.add_argument("--json", action="store_true", help="base64 JSON instead of multipart")
    args = parser.parse_args()
    result = run_load(
        args.url,
        args.image.read_bytes(),
        args.clients,
        args.seconds,
        args.warmup,
        args.procs,
        as_json=args.json,
    )
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()
