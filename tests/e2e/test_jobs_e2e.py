"""End to end, /v1/jobs (issue 15) on a real `detr-serve`: a tiled pyramidal TIFF with planted
shapes read region by region by the job-runner process, its tiles through the engine's batcher;
progress, recall, memory of the whole process tree, cancellation, the queue limit, bad input,
the API key, and a SIGKILL mid-job followed by a restart on the same job store.

The 20,000 x 20,000 run is scripts/bench/bench_jobs.py (figures in the README): about 9,800 tiles,
minutes on CI's 2 cores; here the same path runs on 3,000 x 3,000 (225 tiles)."""

from __future__ import annotations

import io
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from scripts.bench.serverproc import RunningServer
from scripts.training.gigapixel_tiff import recall, write

pytestmark = pytest.mark.e2e

KEY = "jobs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIDE = 3000


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    planted = write(path, SIDE, SIDE, seed=0, levels=2)
    return path, planted


def _server(jobs_dir: Path, *extra: str) -> RunningServer:
    return RunningServer(
        [
            "--workers",
            "1",
            "--api-key",
            KEY,
            "--jobs-dir",
            str(jobs_dir),
            "--max-queued-jobs",
            "1",
            "--max-job-bytes",
            str(20 << 20),
            *extra,
        ],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    srv = _server(tmp_path_factory.mktemp("jobs"))
    yield srv
    srv.stop()


def _submit(srv: RunningServer, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        srv.url + "/v1/jobs",
        files={"file": ("image", data)},
        data=fields,
        headers=AUTH,
        timeout=60,
    )


def _get(srv: RunningServer, job_id: str) -> dict:
    r = httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(srv: RunningServer, job_id: str, done: tuple[str, ...], timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s  # a hang guard, never a measurement
    while time.monotonic() < deadline:
        job = _get(srv, job_id)
        if job["status"] in done:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {done} in {timeout_s} s: {job}")


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_a_tiled_pyramidal_tiff_job_completes_with_monotonic_progress_recall_and_bounded_rss(
    server: RunningServer, slide: tuple[Path, object]
) -> None:
    path, planted = slide
    before = _tree_rss(server.proc.pid)
    r = _submit(server, path.read_bytes())
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and len(body["id"]) >= 22
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    seen, peak = [], before
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = _get(server, body["id"])
        seen.append(job["progress"]["tiles_done"])
        peak = max(peak, _tree_rss(server.proc.pid))
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    assert seen == sorted(seen), seen
    assert job["progress"]["tiles_total"] == 225 and job["progress"]["tiles_done"] == 225
    assert job["image"] == {"width": SIDE, "height": SIDE}
    result = job["result"]
    assert recall(planted.boxes, planted.labels, result["detections"]) >= 0.85
    assert peak - before < 600 << 20, (before, peak)
    lines = httpx.get(f"{server.url}/v1/jobs/{body['id']}/results", headers=AUTH).text.splitlines()
    assert len(lines) == 1 + job["detections"] == 1 + len(result["detections"])
    listed = httpx.get(server.url + "/v1/jobs", headers=AUTH).json()["jobs"]
    assert body["id"] in [j["id"] for j in listed]


def test_a_pyramid_level_is_read_when_asked(
    server: RunningServer, slide: tuple[Path, object]
) -> None:
    r = _submit(server, slide[0].read_bytes(), level="1")
    assert r.status_code == 202, r.text
    job = _wait(server, r.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    assert job["image"] == {"width": SIDE // 2, "height": SIDE // 2}
    r = _submit(server, slide[0].read_bytes(), level="5")
    job = _wait(server, r.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "failed" and "level 5" in job["error"]


def test_the_api_key_applies_and_ids_are_unknown_until_made(server: RunningServer) -> None:
    r = httpx.post(server.url + "/v1/jobs", files={"file": ("x", b"x")})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/jobs/nope").status_code == 401
    r = httpx.get(server.url + "/v1/jobs/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "job_not_found"


def test_bad_inputs_get_a_clear_answer_and_the_server_goes_on(
    server: RunningServer, slide: tuple[Path, object]
) -> None:
    data = slide[0].read_bytes()
    # Not an image: refused at once.
    r = _submit(server, b"hello, not an image" * 10)
    assert r.status_code == 415 and "not a TIFF, JPEG, PNG or WebP" in r.text
    # Over max_job_bytes (20 MiB here).
    r = _submit(server, b"II*\x00" + bytes(21 << 20))
    assert r.status_code == 413, r.text
    # A URL the SSRF rules refuse.
    r = httpx.post(
        server.url + "/v1/jobs", json={"image": {"url": "http://127.0.0.1:1/x.tif"}}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "url_refused", r.text
    # Bad options.
    r = _submit(server, data, threshold="2")
    assert r.status_code == 422 and "threshold" in r.text
    # A truncated TIFF and one whose tiles do not decode: the job fails with the reason.
    truncated = _submit(server, data[:3000]).json()["id"]
    job = _wait(server, truncated, ("succeeded", "failed"))
    assert job["status"] == "failed" and "TIFF" in job["error"], job
    corrupt = bytearray(data)
    middle = len(corrupt) // 2
    corrupt[middle : middle + 200_000] = b"\xff" * 200_000
    job = _wait(server, _submit(server, bytes(corrupt)).json()["id"], ("succeeded", "failed"))
    assert job["status"] == "failed" and "do not decode" in job["error"], job
    # A truncated PNG.
    buf = io.BytesIO()
    Image.new("RGB", (900, 700), (120, 130, 140)).save(buf, format="PNG")
    png = buf.getvalue()
    job = _wait(server, _submit(server, png[: len(png) // 2]).json()["id"], ("succeeded", "failed"))
    assert job["status"] == "failed" and "PNG" in job["error"], job
    # The server is up and a good plain image still runs.
    job = _wait(server, _submit(server, png).json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["image"] == {"width": 900, "height": 700}
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_queued_jobs_are_limited_and_jobs_can_be_cancelled(
    server: RunningServer, slide: tuple[Path, object]
) -> None:
    data = slide[0].read_bytes()
    running = _submit(server, data).json()["id"]
    _wait(server, running, ("running",))
    queued = _submit(server, data)
    assert queued.status_code == 202
    refused = _submit(server, data)  # --max-queued-jobs 1
    assert refused.status_code == 429 and "max_queued_jobs" in refused.text
    for job_id in (queued.json()["id"], running):
        r = httpx.delete(f"{server.url}/v1/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    stopped_at = _get(server, running)["progress"]["tiles_done"]
    time.sleep(2)
    job = _get(server, running)
    assert job["status"] == "cancelled" and job["progress"]["tiles_done"] <= stopped_at + 16
    r = httpx.delete(f"{server.url}/v1/jobs/{running}", headers=AUTH)
    assert r.status_code == 409


def test_sigkill_mid_job_then_restart_fails_it_with_a_reason_and_keeps_finished_results(
    tmp_path: Path, slide: tuple[Path, object]
) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (600, 500), (90, 100, 110)).save(buf, format="PNG")
    srv = _server(tmp_path)
    try:
        finished = _submit(srv, buf.getvalue()).json()["id"]
        done = _wait(srv, finished, ("succeeded",))
        victim = _submit(srv, slide[0].read_bytes()).json()["id"]
        deadline = time.monotonic() + 300
        while _get(srv, victim)["progress"]["tiles_done"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        srv.stop(signal.SIGKILL)
    again = _server(tmp_path)
    try:
        job = _wait(again, victim, ("failed", "succeeded"), timeout_s=60)
        assert job["status"] == "failed" and "interrupted" in job["error"], job
        after = _get(again, finished)
        assert after["status"] == "succeeded" and after["result"] == done["result"]
    finally:
        again.stop()
