"""End to end, tiled inference through the process split: a real `detr-serve` on a real port,
tiles crossing from the front end to the engine process (in the shared-memory arena, or over
the socket when the arena is too small) and filling forward passes there."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.bench.serverproc import RunningServer
from tests.conftest import shapes_image

pytestmark = pytest.mark.e2e

TILES_24 = {"tile_size": 128, "overlap": 0.0, "full_image": False}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        [
            "--model",
            str(tiny_model_dir),
            "--workers",
            "1",
            "--max-batch-size",
            "8",
            "--max-batch-delay-ms",
            "0",
            "--shm-arena-mb",
            "4",
        ],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    yield srv
    srv.stop()


def _post(url: str, image: bytes, tiling: object) -> httpx.Response:
    body = {"images": [{"data": base64.b64encode(image).decode()}], "tiling": tiling}
    return httpx.post(url + "/v1/detect", json=body, timeout=60)


def test_tiles_cross_to_the_engine_and_run_as_batch_items(server: RunningServer) -> None:
    before = httpx.get(server.url + "/metrics").text
    # 768 x 512 (1.2 MB of pixels: in the 4 MB arena) in tiles of 128: 24 tiles, 3 passes.
    r = _post(server.url, shapes_image(768, 512), TILES_24)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["timings"]["tiles"] == 24
    after = httpx.get(server.url + "/metrics").text
    ok = 'detr_serve_batches_total{outcome="ok"}'
    assert _metric(after, ok) - _metric(before, ok) == 3
    assert (
        _metric(after, "detr_serve_tiles_total") - _metric(before, "detr_serve_tiles_total") == 24
    )
    assert (
        _metric(after, "detr_serve_batch_size_sum") - _metric(before, "detr_serve_batch_size_sum")
        == 24
    )


def test_an_image_larger_than_the_arena_travels_inline_and_is_tiled(
    server: RunningServer,
) -> None:
    # 1600 x 1200 x 3 = 5.8 MB: over the 4 MB arena, so its pixels cross over the socket.
    r = _post(
        server.url, shapes_image(1600, 1200), {"tile_size": 400, "overlap": 0.0, "full_image": True}
    )
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["width"], result["height"]) == (1600, 1200)
    assert result["timings"]["tiles"] == 4 * 3 + 1
    for det in result["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 1600 and 0 <= y1 <= y2 <= 1200


def test_bad_tiling_is_422_through_the_real_server(server: RunningServer) -> None:
    r = _post(server.url, shapes_image(), {"overlap": 0.91})
    assert r.status_code == 422
    assert "tiling.overlap" in r.json()["error"]["message"]
