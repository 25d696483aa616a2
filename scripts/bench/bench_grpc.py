"""Benchmark: KServe v2 over gRPC against v2 over HTTP, on one real server, same run.

    python scripts/bench/bench_grpc.py                        # null engine: the protocols' own cost
    python scripts/bench/bench_grpc.py --backend torch          # the default model on the CPU
    python scripts/bench/bench_grpc.py --clients 16 --seconds 10 --rounds 3 --out grpc.json

The server (`detr-serve`, engine process + front-end workers) runs once; each round drives it
for --seconds with --clients threads of the stock tritonclient.grpc, then of tritonclient.http
(binary tensor data), one 640x480 JPEG per request, and reports images/s and latency
percentiles for each, and the grpc/http throughput ratio of each round (the figure to compare
across machines: both sides share the machine's load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts.bench.serverproc import RunningServer  # noqa: E402

MODEL = "bench"


def client_call(protocol: str, server: RunningServer, jpeg: bytes) -> Callable[[], None]:
    """One inference of one image through the stock client of `protocol` (a client each)."""
    images = np.array([jpeg], dtype=np.object_)
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        gclient = grpcclient.InferenceServerClient(server.grpc_url)
        gtensor = grpcclient.InferInput("images", [1], "BYTES")
        gtensor.set_data_from_numpy(images)
        return lambda: gclient.infer(MODEL, [gtensor], client_timeout=60).as_numpy("boxes")
    import tritonclient.http as httpclient

    hclient = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    htensor = httpclient.InferInput("images", [1], "BYTES")
    htensor.set_data_from_numpy(images)
    return lambda: hclient.infer(MODEL, [htensor]).as_numpy("boxes")


def drive(protocol: str, server: RunningServer, jpeg: bytes, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    first_error: list[str] = []
    window = [0.0]  # the end of the measured window, set as the barrier releases everyone
    ready = threading.Barrier(
        clients + 1, action=lambda: window.__setitem__(0, time.monotonic() + seconds)
    )

    def run(i: int) -> None:
        # tritonclient.http's client belongs to the thread that made it (gevent): made here,
        # and its connection opened, before the clock starts.
        call = client_call(protocol, server, jpeg)
        call()
        ready.wait()
        while time.monotonic() < window[0]:
            started = time.perf_counter()
            try:
                call()
            except Exception as exc:
                errors[i] += 1
                first_error.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[i].append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - (window[0] - seconds)
    done = sorted(x for per in latencies for x in per)
    q = statistics.quantiles(done, n=100) if len(done) > 1 else [0.0] * 99
    return {
        "protocol": protocol,
        "images_per_s": round(len(done) / elapsed, 2),
        "p50_ms": round(q[49] * 1e3, 2),
        "p95_ms": round(q[94] * 1e3, 2),
        "errors": sum(errors),
        "first_error": first_error[0] if first_error else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="null", choices=["null", "torch", "onnx"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="detr-serve --workers")
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "shapes-640x480.jpg")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    server_args = ["--backend", args.backend, "--model-name", MODEL]
    if args.workers:
        server_args += ["--workers", str(args.workers)]
    jpeg = args.image.read_bytes()
    server = RunningServer(server_args, ready_timeout_s=300)
    rounds = []
    try:
        for r in range(args.rounds):
            grpc_side = drive("grpc", server, jpeg, args.clients, args.seconds)
            http_side = drive("http", server, jpeg, args.clients, args.seconds)
            ratio = grpc_side["images_per_s"] / max(http_side["images_per_s"], 1e-9)
            rounds.append({"grpc": grpc_side, "http": http_side, "grpc_over_http": ratio})
            for side in (grpc_side, http_side):
                print(
                    f"round {r + 1} {side['protocol']:4s} {side['images_per_s']:8.1f} img/s  "
                    f"p50 {side['p50_ms']:7.1f} ms  p95 {side['p95_ms']:7.1f} ms  "
                    f"errors {side['errors']}"
                )
            for side in (grpc_side, http_side):
                if side["first_error"]:
                    print(f"  {side['protocol']} error: {side['first_error']}")
            print(f"round {r + 1} grpc/http throughput {ratio:.2f}")
    finally:
        server.stop()
    ratios = [x["grpc_over_http"] for x in rounds]
    print(f"grpc/http throughput, {args.rounds} rounds: {min(ratios):.2f}-{max(ratios):.2f}")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "image")}
        args.out.write_text(json.dumps({"settings": settings, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
