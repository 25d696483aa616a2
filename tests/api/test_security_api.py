"""Access control and fault handling through the API: API key, CORS, watchdog."""

from __future__ import annotations

import asyncio
import threading
import time

from tests.api.conftest import CountingEngine, assert_error, b64
from tests.conftest import shapes_image, until


async def test_api_key_is_required_except_on_health_and_metrics(client_factory) -> None:
    client, _ = await client_factory(api_key="s3cret-key")
    body = {"images": [{"data": b64(shapes_image())}]}
    r = await client.post("/v1/detect", json=body)
    assert_error(r, 401, "unauthorized", "Bearer")
    assert r.headers["www-authenticate"] == "Bearer"
    wrong = await client.post("/v1/detect", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = await client.post("/v1/detect", json=body, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200, ok.text
    assert (await client.get("/v1/models")).status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(path)).status_code == 200, path


async def test_no_api_key_means_open_access(client) -> None:
    assert (await client.get("/v1/models")).status_code == 200


async def test_cors_is_off_by_default(client) -> None:
    r = await client.options(
        "/v1/detect",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


async def test_cors_allows_configured_origins_only(client_factory) -> None:
    client, _ = await client_factory(cors_origins="https://app.example")
    pre = {"Access-Control-Request-Method": "POST"}
    ok = await client.options("/v1/detect", headers={"Origin": "https://app.example", **pre})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    bad = await client.options("/v1/detect", headers={"Origin": "https://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


async def test_stuck_inference_turns_readiness_to_503(client_factory) -> None:
    client, _ = await client_factory(watchdog_s=0.2, request_timeout_s=60)
    CountingEngine.gate = threading.Event()  # the forward pass runs until released
    request = asyncio.create_task(
        client.post("/v1/detect", json={"images": [{"data": b64(shapes_image())}]})
    )
    await until(CountingEngine.entered.is_set, "the request is inside the model")
    deadline = time.monotonic() + 30  # a hang guard, not a measurement
    while (stuck := await client.get("/readyz")).json() != {"status": "stuck"}:
        assert time.monotonic() < deadline, stuck.json()
        await asyncio.sleep(0.01)
    assert stuck.status_code == 503
    CountingEngine.gate.set()
    assert (await request).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
