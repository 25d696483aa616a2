"""Chaos run: the guarantees of issue 13 against a real `detr-serve` on 127.0.0.1, one server per
scenario, bounded in time; prints one table row per scenario.

    .venv/bin/python -m scripts.checks.chaos            # every scenario (about a minute on 2 cores)
    .venv/bin/python -m scripts.checks.chaos disconnects sigterm

The engine is the null backend with a fixed time per batch (--null-batch-ms): a slow model
whose timing the scenarios control, with nothing else competing for the cores. The end-to-end
tests (tests/e2e/test_guarantees.py) run the same scenarios and assert on their figures.

Scenarios:
  expired-burst    a burst expires while a long batch runs: the queue holds live work only
                   (depth back to 0 within that batch) and new work is queued, not 429
  disconnects      64 clients that hang up 50 ms after sending (and 64 that hang up once their
                   images are queued): images computed vs sent
  slow-url-storm   slow URLs hold every download slot; uploads keep being answered; the slow
                   requests get 504 at their deadline, not after the download
  sigterm          SIGTERM under load: /readyz 503 "draining" at once, every accepted request
                   answered 200, new ones 503, then exit 0
  stuck-drain      SIGTERM while a forward pass outlives the drain: the open requests are
                   answered 503 at the drain timeout, the server exits within its bound
  failed-load      corrupt weights: exit 1 naming the model and the cause; with
                   --no-exit-on-load-failure, /readyz and the inference routes 503
                   (scripts/checks/failed_load.py)
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from app.config import Settings
from app.process.supervisor import shutdown_bound_s
from scripts.bench.serverproc import RunningServer
from scripts.checks.hostile_payloads import HostileOrigin


@dataclass
class Row:
    scenario: str
    sent: int
    statuses: Counter[int] = field(default_factory=Counter)
    figures: dict[str, float | int | str] = field(default_factory=dict)
    passed: bool = False
    log: str = ""  # the server's log, for a failing test's message

    def line(self) -> str:
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items())) or "-"
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in self.figures.items())
        verdict = "PASS" if self.passed else "FAIL"
        return f"| {self.scenario} | {self.sent} | {statuses} | {figures} | {verdict} |"


def _fmt(value: float | int | str) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def jpeg(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 30)).save(out, "JPEG")
    return out.getvalue()


def json_body(image: bytes) -> bytes:
    return json.dumps({"images": [{"data": base64.b64encode(image).decode()}]}).encode()


def start(*args: str) -> RunningServer:
    """The null engine (no model) behind the real supervisor, engine process and workers."""
    server = RunningServer(["--backend", "null", *args])
    # /readyz said 200 from one worker: wait for every worker to be connected.
    workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
    _until(lambda: server.log().count("front end ready") >= workers, 30)
    return server


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _post(url: str, body: bytes, timeout_s: float = 60) -> Answer:
    try:
        response = httpx.post(
            url + "/v1/detect",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        return 0, {"error": {"type": type(exc).__name__}}  # 0: no answer
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {}


Answer = tuple[int, dict[str, Any]]


def _in_threads(job: Callable[[], Answer], count: int) -> list[Future[Answer]]:
    """Start `count` runs of `job`, each on a thread of its own."""
    pool = ThreadPoolExecutor(count)
    futures = [pool.submit(job) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


# -- scenarios ------------------------------------------------------------------------------
def expired_burst() -> Row:
    """One long batch (8 s) runs; a burst that fills the queue (8 images) expires behind it
    after 1 s. Then the queue must be empty (live work only) and a new request queued (504 at
    its own deadline), not refused 429, while that same batch still runs."""
    row = Row("expired-burst", sent=10)
    server = start(
        *("--workers", "1", "--null-batch-ms", "8000", "--max-batch-size", "1"),
        *("--max-batch-delay-ms", "0", "--max-queue-size", "8", "--request-timeout-s", "1"),
        *("--max-images-per-request", "8"),
    )
    try:
        body = json_body(jpeg())
        (long_batch,) = _in_threads(lambda: _post(server.url, body), 1)
        _until(lambda: metric(server, "detr_serve_inflight_images") >= 1, 10)
        burst = [f.result() for f in _in_threads(lambda: _post(server.url, body), 8)]
        row.statuses.update(status for status, _ in burst)
        # The engine answers a request past its deadline, or its front end cancels it; either
        # way its images leave the queue at that moment (within a scrape's time).
        _until(lambda: metric(server, "detr_serve_queue_depth") == 0, 0.5)
        depth = metric(server, "detr_serve_queue_depth")
        status, _ = _post(server.url, body)
        row.statuses[status] += 1
        running = metric(server, "detr_serve_inflight_images") >= 1  # the first batch still
        row.statuses[long_batch.result()[0]] += 1
        row.figures = {"queue depth after burst": int(depth), "new request": status}
        row.figures["all within the first batch"] = "yes" if running else "no"
        # Every request's deadline (1 s) is shorter than the batch: all 504, none 429.
        row.passed = depth == 0 and status == 504 and row.statuses[504] == 10 and running
    finally:
        server.stop()
        row.log = server.log()
    return row


def disconnects(clients: int = 64, hang_up_s: float | None = 0.05) -> Row:
    """`clients` requests whose clients hang up `hang_up_s` after sending (None: once all their
    images are in the engine), on an engine whose batches (up to 16 images) take 3 s: the images
    computed (detr_serve_batch_size_sum) against those sent; all of them run in 4 batches when
    nothing is cancelled. A request sent last, and answered, proves everything still live before
    it was computed."""
    when = "once queued" if hang_up_s is None else f"{hang_up_s * 1e3:g} ms"
    row = Row(f"disconnects ({when})", sent=clients + 1)
    server = start(
        *("--workers", "2", "--null-batch-ms", "3000", "--max-batch-size", "16"),
        *("--max-batch-delay-ms", "0", "--request-timeout-s", "60"),
    )
    try:
        body = json_body(jpeg())
        before = metric(server, "detr_serve_batch_size_sum")

        def queued() -> float:
            depth = metric(server, "detr_serve_queue_depth")
            return depth + metric(server, "detr_serve_inflight_images")

        in_engine = asyncio.run(_hang_up(server.port, body, clients, hang_up_s, queued))
        status, _ = _post(server.url, body)
        row.statuses[status] += 1
        computed = metric(server, "detr_serve_batch_size_sum") - before - (status == 200)
        row.figures = {
            "images sent": clients,
            "in the engine at hang-up": int(in_engine),
            "images computed": int(computed),
        }
        row.passed = status == 200 and computed < clients
    finally:
        server.stop()
        row.log = server.log()
    return row


async def _hang_up(
    port: int, body: bytes, clients: int, after_s: float | None, queued: Callable[[], float]
) -> float:
    """Send `clients` requests on raw connections and close each `after_s` later (None: once
    `queued()` counts them all in the engine, or 30 s). Returns queued() at the hang-up."""
    head = (
        f"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    hang_up = asyncio.Event()
    in_engine = 0.0

    async def one() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        await writer.drain()
        if after_s is None:
            await hang_up.wait()
        else:
            await asyncio.sleep(after_s)
        writer.close()
        await writer.wait_closed()

    async def watch() -> None:
        nonlocal in_engine
        deadline = time.monotonic() + (30 if after_s is None else after_s)
        while time.monotonic() < deadline:
            in_engine = await asyncio.to_thread(queued)
            if after_s is None and in_engine >= clients:
                break
            if after_s is not None:
                await asyncio.sleep(0.01)
        hang_up.set()

    await asyncio.gather(watch(), *(one() for _ in range(clients)))
    return in_engine


def slow_url_storm(slots: int = 4, uploads: int = 20) -> Row:
    """Twice as many slow URLs as download slots (the origin sends headers, then nothing) while
    uploads keep coming: the uploads are answered 200, every slow request 504 at its deadline
    (2 s) while the origin still holds its connections open."""
    row = Row("slow-url-storm", sent=2 * slots + uploads)
    origin = HostileOrigin()
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(120)
        yield b""

    slow = origin.serve("/slow.jpg", never, headers={"Content-Type": "image/jpeg"})
    server = start(
        *("--workers", "1", "--allow-private-urls", "--url-timeout-s", "60"),
        *("--max-concurrent-downloads", str(slots), "--request-timeout-s", "2"),
        *("--max-batch-delay-ms", "0"),
    )
    try:
        url_body = json.dumps({"images": [{"url": slow}]}).encode()
        slow_jobs = _in_threads(lambda: _post(server.url, url_body), 2 * slots)
        upload = json_body(jpeg())
        latencies = []
        for _ in range(uploads):
            sent = time.monotonic()
            status, _ = _post(server.url, upload)
            latencies.append(time.monotonic() - sent)
            row.statuses[status] += 1
        slow_answers = [f.result() for f in slow_jobs]
        held = not release.is_set()
        row.statuses.update(status for status, _ in slow_answers)
        deadline_type = all(
            a.get("error", {}).get("type") == "deadline_exceeded" for _, a in slow_answers
        )
        row.figures = {
            "download slots": slots,
            "uploads answered 200": row.statuses[200],
            "slowest upload s": round(max(latencies), 3),
            "slow URLs 504 (origin still sending)": sum(s == 504 for s, _ in slow_answers)
            if held
            else "origin released",
        }
        row.passed = row.statuses[200] == uploads and row.statuses[504] == 2 * slots
        row.passed = row.passed and held and deadline_type
    finally:
        release.set()
        server.stop()
        row.log = server.log()
    return row


def sigterm(accepted: int = 16) -> Row:
    """`accepted` requests are in the engine's queue (a batch that waits 3 s to fill, then
    runs 0.5 s) when SIGTERM reaches the supervisor: /readyz must answer 503 "draining" at once,
    the accepted ones 200, a new one 503, and the server exit 0 once they are answered."""
    row = Row("sigterm", sent=accepted + 1)
    server = start(
        *("--workers", "2", "--null-batch-ms", "500", "--max-batch-size", "64"),
        *("--max-batch-delay-ms", "3000", "--drain-timeout-s", "20"),
    )
    try:
        body = json_body(jpeg())
        # What one /readyz poll costs on this machine now: the bound on how soon a client can
        # see the change.
        poll_s = sorted(_timed_get(server.url + "/readyz") for _ in range(9))[4]
        jobs = _in_threads(lambda: _post(server.url, body), accepted)
        # Accepted: every request is in the engine's queue.
        _until(lambda: metric(server, "detr_serve_queue_depth") >= accepted, 20)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        readyz = _first_answer(server.url + "/readyz", signalled)
        new_status, _ = _post(server.url, body, timeout_s=10)
        answers = [f.result() for f in jobs]
        row.statuses.update(status for status, _ in answers)
        row.statuses[new_status] += 1
        code = server.proc.wait(60)
        exit_s = time.monotonic() - signalled
        readyz_status, readyz_body, readyz_s = readyz
        row.figures = {
            "accepted": accepted,
            "accepted answered 200": sum(s == 200 for s, _ in answers),
            "/readyz after signal": f"{readyz_status} {readyz_body.get('status')}",
            "/readyz 503 after ms": round(readyz_s * 1e3, 1),
            "one /readyz poll ms (median before)": round(poll_s * 1e3, 1),
            "new request": new_status,
            "exit code": code,
            "exit s": round(exit_s, 2),
        }
        row.figures["signal to front ends draining ms (logs)"] = _log_gap_ms(
            server.log(), "SIGTERM: draining", "front end draining"
        )
        row.passed = (
            all(s == 200 for s, _ in answers)
            and readyz_status == 503
            and readyz_body.get("status") == "draining"
            and new_status == 503
            and code == 0
        )
    finally:
        server.stop()
        row.log = server.log()
    return row


def _log_gap_ms(log: str, first: str, last: str) -> float | str:
    """Milliseconds from the log line holding `first` to the last line holding `last`."""
    stamps: dict[str, list[datetime.datetime]] = {first: [], last: []}
    for line in log.splitlines():
        for key, found in stamps.items():
            if key in line:
                found.append(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"))
    if not stamps[first] or not stamps[last]:
        return "not logged"
    return round((max(stamps[last]) - stamps[first][0]).total_seconds() * 1e3, 1)


def _timed_get(url: str) -> float:
    started = time.monotonic()
    httpx.get(url, timeout=10)
    return time.monotonic() - started


def _first_answer(url: str, since: float) -> tuple[int, dict[str, Any], float]:
    """The first /readyz answer that is not 200 (polled from `since`), and when it came."""
    while time.monotonic() - since < 10:
        try:
            response = httpx.get(url, timeout=2)
        except httpx.HTTPError:
            continue
        if response.status_code != 200:
            return response.status_code, response.json(), time.monotonic() - since
    return 200, {"status": "ready"}, time.monotonic() - since


def stuck_drain(drain_s: float = 1.0) -> Row:
    """A forward pass that takes 10 minutes when SIGTERM comes, drain_timeout_s 1: its request
    and a queued one are answered 503 at the drain's end, and the server exits within
    shutdown_bound_s (what terminationGracePeriodSeconds is sized from)."""
    row = Row("stuck-drain", sent=2)
    server = start(
        *("--workers", "1", "--null-batch-ms", "600000", "--max-batch-size", "1"),
        *("--max-batch-delay-ms", "0", "--drain-timeout-s", str(drain_s)),
        *("--request-timeout-s", "600"),
    )
    try:
        body = json_body(jpeg())
        jobs = _in_threads(lambda: _post(server.url, body, timeout_s=120), 2)
        _until(
            lambda: (
                metric(server, "detr_serve_queue_depth")
                + metric(server, "detr_serve_inflight_images")
                >= 2
            ),
            20,
        )
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in jobs]
        answered_s = time.monotonic() - signalled
        code = server.proc.wait(120)
        exit_s = time.monotonic() - signalled
        bound = shutdown_bound_s(Settings(drain_timeout_s=drain_s))
        row.statuses.update(status for status, _ in answers)
        row.figures = {
            "answered s": round(answered_s, 2),
            "exit s": round(exit_s, 2),
            "bound s": bound,
            "exit code": code,
        }
        bodies_ok = all(isinstance(a.get("error"), dict) for _, a in answers)
        row.passed = row.statuses[503] == 2 and bodies_ok and exit_s < bound and code == 0
    finally:
        server.stop()
        row.log = server.log()
    return row


def failed_load() -> Row:
    """A model whose weights are corrupt, both ways (scripts/checks/failed_load.py): by default the
    server exits 1 with a log line naming the model folder and the cause; staying up
    (--no-exit-on-load-failure), /readyz says "failed" and the inference routes answer 503."""
    from scripts.checks.failed_load import failed_load_row

    row = Row("failed-load (corrupt weights)", sent=2)
    exits = failed_load_row("corrupt-weights", stay_up=False)
    stays = failed_load_row("corrupt-weights", stay_up=True)
    for status in (stays.get("detect"), stays.get("v2_infer")):
        if status is not None:
            row.statuses[status] += 1
    row.figures = {
        "exit status": exits["exit_status"],
        "exit s": exits["seconds"],
        "log names model and cause": (
            "yes" if exits["log_names_model"] and exits["log_names_cause"] else "no"
        ),
        "staying up: /readyz": (
            f"{stays.get('readyz')} {stays.get('readyz_body', {}).get('status')}"
        ),
    }
    row.passed = (
        exits["exit_status"] == 1
        and bool(exits["log_names_model"] and exits["log_names_cause"])
        and stays.get("readyz") == 503
        and row.statuses == Counter({503: 2})
    )
    row.log = str(exits.get("log", ""))
    return row


SCENARIOS: dict[str, Callable[[], Row]] = {
    "expired-burst": expired_burst,
    "disconnects": disconnects,
    "disconnects-queued": lambda: disconnects(hang_up_s=None),
    "slow-url-storm": slow_url_storm,
    "sigterm": sigterm,
    "stuck-drain": stuck_drain,
    "failed-load": failed_load,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    print("| scenario | requests | statuses | figures | verdict |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for name in names:
        row = SCENARIOS[name]()
        rows.append(row)
        print(row.line(), flush=True)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
