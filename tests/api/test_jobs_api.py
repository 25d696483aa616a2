"""/v1/jobs in one process (--no-engine-process, the in-process app): the runner is a task of
the lifespan and sends its tiles to the EngineHost's batcher directly; a PNG job runs to the
end, the JSON form's errors name the field."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
from PIL import Image

from tests.api.conftest import assert_error


async def _until_done(client: httpx.AsyncClient, job_id: str) -> dict:
    for _ in range(1200):  # a hang guard: 120 s
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] not in ("queued", "running"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(job)


async def test_a_job_runs_in_one_process(client_factory, tmp_path: Path) -> None:
    client, _ = await client_factory(jobs_dir=tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (40, 90, 160)).save(buf, format="PNG")
    r = await client.post(
        "/v1/jobs",
        files={"file": ("a.png", buf.getvalue())},
        data={"max_detections": "5", "threshold": "0.0", "tiling": '{"tile_size": 128}'},
    )
    assert r.status_code == 202, r.text
    job = await _until_done(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    # 300 x 200 in tiles of 128 stepping 103 (overlap 0.2): 3 x 2.
    assert job["progress"]["tiles_total"] == 6 == job["progress"]["tiles_done"]
    assert job["image"] == {"width": 300, "height": 200}
    assert len(job["result"]["detections"]) <= 5 and job["result"]["width"] == 300
    listed = (await client.get("/v1/jobs", params={"status": "succeeded", "limit": 10})).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert (await client.get("/v1/jobs", params={"status": "running"})).json() == {"jobs": []}


async def test_json_jobs_name_what_is_wrong(client_factory, tmp_path: Path) -> None:
    client, _ = await client_factory(jobs_dir=tmp_path)
    r = await client.post("/v1/jobs", json={"image": {"url": "ftp://example.com/a.tif"}})
    assert_error(r, 400, "url_refused", "scheme")
    r = await client.post("/v1/jobs", json={"image": {"url": "http://x/a.tif"}, "level": -1})
    assert_error(r, 422, "validation_error", "level")
    r = await client.post(
        "/v1/jobs", json={"image": {"url": "http://x/a.tif"}, "tiling": {"full_image": True}}
    )
    assert_error(r, 400, "invalid_request", "full_image")
    r = await client.post("/v1/jobs", json={"image": {"url": "http://x/a.tif"}, "classes": ["?"]})
    assert_error(r, 400, "invalid_request", "unknown class")
    r = await client.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_image")
    assert (await client.get("/v1/jobs")).json() == {"jobs": []}


async def test_a_method_the_path_lacks_is_405_naming_every_method_it_has(
    client_factory, tmp_path: Path
) -> None:
    client, _ = await client_factory(jobs_dir=tmp_path)
    r = await client.request("OPTIONS", "/v1/jobs/0")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET"
    r = await client.put("/v1/jobs")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
