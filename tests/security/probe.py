"""The watch's probe, run as its own process (`python probe.py PORT PID INTERVAL_S`) so that
the test process's own load and garbage collection never count as the server's latency.

It GETs /healthz every INTERVAL_S on one kept-alive connection and samples the resident memory
of PID's process tree, prints "ready" after its first probe, and when its stdin closes prints
one JSON line: {"latencies": [s, ...], "failures": [...], "peak_rss": bytes}.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time

import psutil


def tree_rss(pid: int) -> int:
    total = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    port, pid, interval_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    peak = [tree_rss(pid)]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(pid))
            stop.wait(0.01)

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=sample, daemon=True).start()
    threading.Thread(target=wait_for_eof, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append(f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            failures.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        latencies.append(time.perf_counter() - started)
        if len(latencies) == 1:
            print("ready", flush=True)
        stop.wait(interval_s)
    conn.close()
    print(json.dumps({"latencies": latencies, "failures": failures, "peak_rss": peak[0]}))


if __name__ == "__main__":
    main()
