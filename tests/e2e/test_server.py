"""End to end: the real `detr-serve` process on a real port, driven over HTTP."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scripts.bench.serverproc import RunningServer
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        [
            "--model",
            str(tiny_model_dir),
            "--default-threshold",
            "0.0",
            "--max-batch-delay-ms",
            "20",
        ],
        env={"DETR_SERVE_ALLOW_PRIVATE_URLS": "true", "DETR_SERVE_TORCH_THREADS": "1"},
    )
    yield srv
    srv.stop()


def test_upload_base64_and_url_give_the_same_boxes(server, image_server) -> None:
    data = httpx.get(image_server + "/shapes.jpg").content
    up = httpx.post(server.url + "/v1/detect", files=[("file", ("a.jpg", data, "image/jpeg"))])
    b64 = httpx.post(
        server.url + "/v1/detect", json={"images": [{"data": base64.b64encode(data).decode()}]}
    )
    url = httpx.post(
        server.url + "/v1/detect", json={"images": [{"url": image_server + "/shapes.jpg"}]}
    )
    for r in (up, b64, url):
        assert r.status_code == 200, r.text
    boxes = [[d["box"] for d in r.json()["results"][0]["detections"]] for r in (up, b64, url)]
    assert boxes[0] and boxes[0] == boxes[1] == boxes[2]


def test_health_models_and_metrics(server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/v1/models").json()["models"][0]["device"] == "cpu"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "detr_serve_http_requests_total" in metrics.text


def test_concurrent_clients_are_batched(server) -> None:
    body = {"images": [{"data": base64.b64encode(shapes_image()).decode()}]}
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda _: client.post(server.url + "/v1/detect", json=body), range(16))
        )
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["results"][0]["timings"]["batch_size"] for r in responses) > 1


def test_sigterm_finishes_accepted_requests_then_exits(tiny_model_dir) -> None:
    srv = RunningServer(
        ["--model", str(tiny_model_dir), "--max-batch-size", "1"],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    body = {"images": [{"data": base64.b64encode(shapes_image()).decode()}] * 16}
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(httpx.post, srv.url + "/v1/detect", json=body, timeout=30) for _ in range(4)
        ]
        # Accepted: all four are open in the front ends (a request that comes after SIGTERM
        # is refused 503).
        deadline = time.monotonic() + 30
        while _open_requests(srv.url) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        code = srv.stop(signal.SIGTERM)
        results = [f.result() for f in futures]
    # uvicorn re-raises the signal once it has shut down cleanly, so -SIGTERM is a clean exit.
    assert code in (0, -signal.SIGTERM), srv.log()
    assert srv.leftovers == [], "engine or front-end processes outlived the supervisor"
    assert [r.status_code for r in results] == [200] * 4
    log = srv.log()
    # The drain's order: readiness 503 at once, the engine finishes and exits, then the front
    # ends stop (app/process/supervisor.py _Drain).
    order = ["SIGTERM: draining", "front end draining", "engine stopped", "Shutting down"]
    assert [log.index(line) for line in order] == sorted(log.index(line) for line in order), log
    assert log.index("Shutting down") < log.index("Finished server"), log


def _open_requests(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(r"^detr_serve_open_requests (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_cli_refuses_bad_settings_before_starting() -> None:
    script = Path(sys.executable).parent / "detr-serve"
    proc = subprocess.run(
        [str(script), "--max-batch-size", "-3", "--model", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--max-batch-size / DETR_SERVE_MAX_BATCH_SIZE" in proc.stderr
    assert "--model / DETR_SERVE_MODEL" in proc.stderr


def test_one_process_mode_still_serves(tiny_model_dir) -> None:
    srv = RunningServer(
        ["--model", str(tiny_model_dir), "--no-engine-process", "--default-threshold", "0.0"],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    try:
        r = httpx.post(srv.url + "/v1/detect", json={"images": [{"data": _B64}]}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["detections"]
        assert "engine 0 started" not in srv.log()  # no engine process
        assert "detr_serve_images_total 1.0" in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()


_B64 = base64.b64encode(shapes_image()).decode()
