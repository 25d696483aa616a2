"""Tiled inference through the app in-process (the real engine on the tiny model): the option
on JSON, multipart and KServe v2, tiles as batch items, limits and the 4xx naming the field."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.api.conftest import CountingEngine, assert_error, b64
from tests.conftest import shapes_image

# 768 x 512 in tiles of 128 without overlap: 6 x 4 = 24 tiles.
WIDE = shapes_image(768, 512)
TILES_24 = {"tile_size": 128, "overlap": 0.0, "full_image": False}


def _body(tiling: object, image: bytes = WIDE, **extra: object) -> dict:
    return {"images": [{"data": b64(image)}], "tiling": tiling, **extra}


async def test_tiles_of_one_image_run_as_batch_items_24_tiles_in_3_forward_passes(
    client_factory,
) -> None:
    client, _ = await client_factory(max_batch_size=8, max_batch_delay_ms=0)
    r = await client.post("/v1/detect", json=_body(TILES_24))
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["width"], result["height"]) == (768, 512)
    assert result["timings"]["tiles"] == 24
    assert result["timings"]["batch_size"] == 8
    assert CountingEngine.images_seen == 24
    assert CountingEngine.batches_run == 3
    for det in result["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= 768 and 0 <= y1 <= y2 <= 512
    # The full-image pass adds one item: 25 items, 4 passes.
    CountingEngine.images_seen = CountingEngine.batches_run = 0
    r = await client.post("/v1/detect", json=_body({**TILES_24, "full_image": True}))
    assert r.json()["results"][0]["timings"]["tiles"] == 25
    assert (CountingEngine.images_seen, CountingEngine.batches_run) == (25, 4)


async def test_one_tile_covering_the_image_answers_as_the_plain_request(client) -> None:
    image = shapes_image(320, 240)
    plain = await client.post("/v1/detect", json={"images": [{"data": b64(image)}]})
    # A tile larger than the image is the image; a match threshold of 1 merges nothing.
    keep_all = {"tile_size": 512, "merge": "nms", "match_metric": "iou", "match_threshold": 1.0}
    tiled = await client.post("/v1/detect", json=_body(keep_all, image))
    assert plain.status_code == tiled.status_code == 200, tiled.text
    a, b = plain.json()["results"][0], tiled.json()["results"][0]
    assert b["timings"]["tiles"] == 1
    assert len(a["detections"]) == len(b["detections"]) > 0
    for da, db in zip(a["detections"], b["detections"], strict=True):
        assert da["class_id"] == db["class_id"]
        assert da["score"] == pytest.approx(db["score"], abs=1e-4)
        assert da["box"] == pytest.approx(db["box"], abs=0.05)


async def test_multipart_takes_true_auto_and_the_object_as_json_text(client) -> None:
    files = {"file": ("wide.jpg", WIDE, "image/jpeg")}
    r = await client.post("/v1/detect", files=files, data={"tiling": json.dumps(TILES_24)})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["timings"]["tiles"] == 24
    r = await client.post("/v1/detect", files=files, data={"tiling": "true"})
    # Default tile size: the tiny model's input side (64): many tiles, plus the full image.
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["timings"]["tiles"] > 24
    small = {"file": ("small.jpg", shapes_image(100, 80), "image/jpeg")}
    r = await client.post("/v1/detect", files=small, data={"tiling": "auto"})
    assert r.status_code == 200, r.text
    assert "tiles" not in r.json()["results"][0]["timings"]  # under the auto factor: whole


async def test_auto_tiles_only_the_large_images_of_a_request(client) -> None:
    body = {
        "images": [{"data": b64(shapes_image(100, 80))}, {"data": b64(WIDE)}],
        "tiling": {"auto": True, "tile_size": 128, "overlap": 0.0, "full_image": False},
    }
    r = await client.post("/v1/detect", json=body)
    assert r.status_code == 200, r.text
    small, large = r.json()["results"]
    assert "tiles" not in small["timings"] and large["timings"]["tiles"] == 24


async def test_kserve_v2_takes_tiling_as_a_parameter(client) -> None:
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(WIDE)]}],
        "parameters": {"tiling": json.dumps(TILES_24)},
    }
    # Binary extension: JSON header then the 4-byte length + bytes of the image.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(WIDE)},
                }
            ],
            "parameters": {"tiling": json.dumps(TILES_24)},
        }
    ).encode()
    payload = header + len(WIDE).to_bytes(4, "little") + WIDE
    r = await client.post(
        "/v2/models/tiny/infer",
        content=payload,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    assert CountingEngine.images_seen == 24
    body["parameters"] = {"tiling": {"overlap": 2}}
    r = await client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 422, r.text
    assert "parameters.tiling" in r.json()["error"] and "overlap" in r.json()["error"]


@pytest.mark.parametrize(
    ("tiling", "text"),
    [
        ({"tile_size": 32}, "tiling.tile_size"),
        ({"overlap": 0.95}, "tiling.overlap"),
        ({"overlap": -0.1}, "tiling.overlap"),
        ({"merge": "union"}, "tiling.merge"),
        ({"match_metric": "giou"}, "tiling.match_metric"),
        ({"match_threshold": 0}, "tiling.match_threshold"),
        ({"tiles": 4}, "tiling.tiles"),
        ("sometimes", "tiling must be true"),
        (3, "tiling must be true"),
    ],
)
async def test_bad_tiling_options_are_422_naming_the_field(client, tiling, text) -> None:
    r = await client.post("/v1/detect", json=_body(tiling))
    assert_error(r, 422, "validation_error", text)
    files = {"file": ("wide.jpg", WIDE, "image/jpeg")}
    form = tiling if isinstance(tiling, str) else json.dumps(tiling)
    r = await client.post("/v1/detect", files=files, data={"tiling": form})
    assert_error(r, 422, "validation_error", text)


async def test_multipart_tiling_that_is_not_json_is_422(client) -> None:
    files = {"file": ("wide.jpg", WIDE, "image/jpeg")}
    r = await client.post("/v1/detect", files=files, data={"tiling": "{tile_size: 4"})
    assert_error(r, 422, "validation_error", "not valid JSON")


async def test_too_many_tiles_is_a_413_before_anything_is_decoded(client_factory) -> None:
    client, _ = await client_factory(tiling_max_tiles=20)
    r = await client.post("/v1/detect", json=_body(TILES_24))
    assert_error(r, 413, "payload_too_large", "24 tiles, over the limit of 20")
    assert CountingEngine.images_seen == 0


async def test_tiled_images_may_exceed_max_image_pixels_up_to_the_tiled_limit(
    client_factory,
) -> None:
    client, _ = await client_factory(max_image_pixels=100_000, max_tiled_image_pixels=500_000)
    r = await client.post("/v1/detect", json={"images": [{"data": b64(WIDE)}]})
    assert_error(r, 413, "image_too_large", "over the limit of 100000")
    r = await client.post("/v1/detect", json=_body(TILES_24))
    assert r.status_code == 200, r.text
    big = shapes_image(1000, 600)  # 600,000 pixels: over the tiled limit too
    r = await client.post("/v1/detect", json=_body(TILES_24, big))
    assert_error(r, 413, "image_too_large", "over the limit of 500000")


async def test_tiles_count_as_images_in_the_queue_bound(client_factory) -> None:
    client, _ = await client_factory(
        max_queue_size=30, tiling_max_tiles=24, max_batch_size=8, max_batch_delay_ms=0
    )
    CountingEngine.delay_s = 0.3
    first = asyncio.create_task(client.post("/v1/detect", json=_body(TILES_24)))
    while CountingEngine.images_seen == 0:
        await asyncio.sleep(0.01)
    # 16 of the first request's tiles still wait: 16 + 24 > 30.
    second = await client.post("/v1/detect", json=_body(TILES_24))
    assert_error(second, 429, "queue_full")
    assert (await first).status_code == 200
    CountingEngine.delay_s = 0.0
