"""End to end, the process split: front-end workers and the engine process of a real
`detr-serve` on a real port. Metrics are one view whichever worker answers; an engine killed
under load fails only with 503 JSON, comes back by itself; a killed worker is replaced."""

from __future__ import annotations

import base64
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from app.process.openmp_policy import ENGINE_SPINCOUNT
from scripts.bench.serverproc import RunningServer
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e

BODY = {"images": [{"data": base64.b64encode(shapes_image()).decode()}]}


def _server(model: Path, *extra: str) -> RunningServer:
    srv = RunningServer(
        ["--model", str(model), "--workers", "2", "--max-batch-delay-ms", "10", *extra],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    # /readyz answered 200 from one worker: wait for the other to connect to the engine too.
    _wait(lambda: srv.log().count("front end ready") == 2, 30, "both workers")
    return srv


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = _server(tiny_model_dir)
    yield srv
    srv.stop()


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the exposition"
    return float(match.group(1))


def _wait(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"Started server process \[(\d+)\]", log)]


def _engine_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"engine 0 started \(pid (\d+)\)", log)]


def test_metrics_are_one_view_whichever_worker_answers(server: RunningServer) -> None:
    assert len(_worker_pids(server.log())) == 2, server.log()
    for _ in range(12):  # a new connection each: the kernel spreads them over the workers
        r = httpx.post(server.url + "/v1/detect", json=BODY, timeout=30)
        assert r.status_code == 200, r.text
    detect_ok = 'detr_serve_http_requests_total{method="POST",route="/v1/detect",status="200"}'
    scrapes = 'detr_serve_http_requests_total{method="GET",route="/metrics",status="200"}'
    for k in range(20):
        text = httpx.get(server.url + "/metrics", timeout=10).text
        assert _sample(text, "detr_serve_images_total") == 12
        assert _sample(text, detect_ok) == 12
        # Each scrape sees every earlier scrape, whichever worker served it: a per-worker
        # registry would show only its own share.
        seen = _sample(text, scrapes) if scrapes in text else 0.0
        assert seen == k, (k, seen)
        # Written by the engine process, read by the front ends.
        assert _sample(text, "detr_serve_batch_size_count") >= 1
        assert 'detr_serve_model_info{architecture="RTDetrForObjectDetection"' in text
        assert _sample(text, "detr_serve_queue_depth") == 0
        assert _sample(text, "detr_serve_engine_restarts_total") == 0


def test_killed_engine_fails_only_with_503_and_comes_back_by_itself(
    server: RunningServer,
) -> None:
    (engine_pid,) = _engine_pids(server.log())
    outcomes: list[tuple[int, dict]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    r = http.post(server.url + "/v1/detect", json=BODY)
                    outcomes.append((r.status_code, r.json()))
                except BaseException as exc:  # a hung or dropped client fails the test
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: sum(1 for s, _ in outcomes if s == 200) >= 10, 60, "load")
        os.kill(engine_pid, signal.SIGKILL)
        _wait(lambda: not _ready(server.url), 10, "/readyz to turn 503")
        _wait(lambda: len(_engine_pids(server.log())) == 2, 30, "a new engine process")
        _wait(lambda: _ready(server.url), 120, "/readyz to turn 200 again")
        after = len(outcomes)
        _wait(lambda: sum(1 for s, _ in outcomes[after:] if s == 200) >= 10, 60, "answers")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a client hung"
    failed = [(s, b) for s, b in outcomes if s != 200]
    assert failed, "the engine held requests when it was killed: some should have failed"
    for status, body in failed:
        assert status == 503, (status, body)
        assert body["error"]["type"] == "unavailable", body
    for status, body in outcomes[after:]:
        assert status == 200 or body["error"]["type"] == "unavailable", body
    new_pid = _engine_pids(server.log())[-1]
    assert new_pid != engine_pid
    text = httpx.get(server.url + "/metrics").text
    assert _sample(text, "detr_serve_engine_restarts_total") == 1
    # Ready again without a manual step: every worker answers.
    for _ in range(10):
        r = httpx.post(server.url + "/v1/detect", json=BODY, timeout=30)
        assert r.status_code == 200, r.text


def test_killed_front_end_worker_is_replaced(server: RunningServer) -> None:
    first = _worker_pids(server.log())
    assert len(first) == 2
    os.kill(first[0], signal.SIGKILL)
    _wait(lambda: f"Child process [{first[0]}] died" in server.log(), 30, "uvicorn to notice")
    _wait(lambda: len(_worker_pids(server.log())) == 3, 60, "a new worker")
    replacement = _worker_pids(server.log())[-1]
    _wait(lambda: f"[{replacement}]" in server.log() and _ready(server.url), 60, "readiness")
    time.sleep(1.0)  # the new worker connects to the engine (it polls every 50 ms)
    for _ in range(20):  # new connections: they reach both the old and the new worker
        r = httpx.post(server.url + "/v1/detect", json=BODY, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    os.kill(replacement, 0)  # alive


def test_engine_and_workers_die_with_a_killed_supervisor(server: RunningServer) -> None:
    children = [c.pid for c in psutil.Process(server.proc.pid).children()]
    assert len(children) >= 3  # the engine, two workers (and the resource tracker)
    server.proc.kill()  # SIGKILL: no chance to stop them itself
    server.proc.wait()

    def gone() -> bool:
        return all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in children)

    _wait(gone, 30, "the supervisor's children to exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_only_the_engine_process_loads_openmp(server: RunningServer) -> None:
    """torch's OpenMP threads live in the engine process; the front ends never load OpenMP,
    so its wait policy and spinning concern the engine alone (README, torch end to end)."""
    (engine,) = _engine_pids(server.log())
    assert any("libgomp" in m.path for m in psutil.Process(engine).memory_maps())
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):  # else the user's wins
        # The short spin of app/process/openmp_policy.py, read by libgomp as the engine starts.
        assert psutil.Process(engine).environ().get("GOMP_SPINCOUNT") == str(ENGINE_SPINCOUNT)
    for worker in _worker_pids(server.log()):
        assert not any("libgomp" in m.path for m in psutil.Process(worker).memory_maps())


def test_the_benchmarks_cpu_split_names_each_process_by_its_role(server: RunningServer) -> None:
    """scripts/bench/bench_compare.py's CPU split (`--e2e-vs-raw`): the engine, the supervisor and
    its uvicorn workers as the front end, the workers' decode processes, and the rest, each
    process once."""
    from scripts.bench.bench_compare import _roles

    log = server.log()
    workers = _worker_pids(log)
    _wait(lambda: all(psutil.Process(w).children() for w in workers), 30, "decode workers")
    roles = _roles(server)
    assert roles["engine"] == _engine_pids(log)
    assert sorted(roles["front end"]) == sorted([server.proc.pid, *workers])
    assert roles["decode"], "no decode worker found"
    assert all(psutil.Process(p).ppid() in workers for p in roles["decode"])
    runner = re.findall(r"job-runner \d+ started \(pid (\d+)\)", log)
    assert {int(p) for p in runner} <= set(roles["other"])
    found = [p for pids in roles.values() for p in pids]
    everyone = [server.proc.pid, *(c.pid for c in psutil.Process(server.proc.pid).children(True))]
    assert sorted(found) == sorted(everyone)
