"""Issue 20, finding 2: images of a few kilobytes that decode to 40 megapixels each. Work is
admitted by decoded pixels (per request: 413; server-wide: 429), large images are reduced to the
model's input while they decode, and the answer keeps the original's size and coordinates.

Bounds asserted here, against the server on its defaults (max_request_pixels 200 M,
max_inflight_pixels 400 M): a refusal within 10 s, /healthz within 100 ms throughout, and the
server's process tree growing by at most the MB stated in each test.
"""

from __future__ import annotations

import time

import httpx
import pytest
from PIL import Image

from scripts.checks.hostile_payloads import HEIGHT, PIXEL_FLOODS, WIDTH
from scripts.checks.hostile_payloads import encode as _encode
from tests.security.conftest import assert_refused, concurrently

PER_REQUEST_LIMIT = 200_000_000
PAYLOADS = PIXEL_FLOODS
_cache: dict[str, bytes] = {}


def payload(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = PAYLOADS[name]()
    return _cache[name]


def detect(url: str, images: list[bytes], timeout: float = 60) -> httpx.Response:
    files = [
        ("file", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)
    ]
    return httpx.post(url + "/v1/detect", files=files, timeout=timeout)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_sixteen_40_megapixel_images_are_refused_by_the_request_budget(
    hostile_server, watch, name: str
) -> None:
    data = payload(name)
    assert len(data) < 2_000_000  # a few KB on the wire (the LZW TIFF: 1.6 MB)
    with watch(hostile_server) as report:
        started = time.perf_counter()
        response = detect(hostile_server.url, [data] * 16)
        elapsed = time.perf_counter() - started
    assert_refused(response, (413,), "16 images decode to", f"limit of {PER_REQUEST_LIMIT}")
    assert elapsed < 10, elapsed
    report.assert_bounds(rss_growth_mb=150)


def test_six_concurrent_requests_of_sixteen_40_megapixel_images_are_refused(
    hostile_server, watch
) -> None:
    names = sorted(PAYLOADS)
    with watch(hostile_server) as report:
        started = time.perf_counter()
        responses = concurrently(
            6, lambda i: detect(hostile_server.url, [payload(names[i % len(names)])] * 16)
        )
        elapsed = time.perf_counter() - started
    for response in responses:
        assert_refused(response, (413,), "pixels", f"limit of {PER_REQUEST_LIMIT}")
    assert elapsed < 15, elapsed
    report.assert_bounds(rss_growth_mb=200)


@pytest.mark.parametrize(
    ("name", "count"),
    [("1-bit-png", 4), ("16-bit-png", 4), ("deflate-tiff", 4), ("lossless-webp", 1)],
)
def test_40_megapixel_images_within_the_budget_are_answered_in_original_pixels(
    hostile_server, watch, name: str, count: int
) -> None:
    # Four 40-megapixel images: 160 M pixels, within the request's budget (a WebP counts four
    # times: its decoder holds four times the memory). Each is decoded and reduced to the
    # model's input at once: nothing holds it at full size in float32.
    with watch(hostile_server) as report:
        started = time.perf_counter()
        response = detect(hostile_server.url, [payload(name)] * count)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text[:500]
    results = response.json()["results"]
    assert [(r["width"], r["height"]) for r in results] == [(WIDTH, HEIGHT)] * count
    for r in results:
        for det in r["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT, det
    assert elapsed < 30, elapsed
    # Two decodes at a time (the machine's decode threads), each a 40 MP image in its own
    # mode plus an 8-bit copy: 16 x 120 MB were held at once before.
    report.assert_bounds(rss_growth_mb=700)


def test_sixteen_40_megapixel_jpegs_decode_at_a_reduced_scale(hostile_server, watch) -> None:
    # A 40 MP JPEG decodes at 1/8 scale (625 k pixels): 16 of them fit the request's budget.
    data = _encode(Image.new("RGB", (WIDTH, HEIGHT), (10, 200, 30)), "JPEG", quality=30)
    with watch(hostile_server) as report:
        started = time.perf_counter()
        response = detect(hostile_server.url, [data] * 16)
        elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text[:500]
    assert [(r["width"], r["height"]) for r in response.json()["results"]] == [(WIDTH, HEIGHT)] * 16
    assert elapsed < 20, elapsed
    report.assert_bounds(rss_growth_mb=250)


def test_the_server_wide_budget_refuses_what_does_not_fit_with_retry_after(
    hostile_server, watch
) -> None:
    # Ten concurrent requests of five 40 MP images each (200 M pixels, the per-request limit):
    # the server-wide budget of 400 M pixels holds two at once; the rest wait up to a second
    # for room and are refused with 429 and Retry-After, never decoded.
    images = [payload("16-bit-png")] * 5
    with watch(hostile_server) as report:
        started = time.perf_counter()
        responses = concurrently(10, lambda i: detect(hostile_server.url, images))
        elapsed = time.perf_counter() - started
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [(r.status_code, r.text[:200]) for r in responses]
    assert 200 in statuses and 429 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            assert_refused(response, (429,), "decoded pixels", "budget of 400000000")
            assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 60, elapsed
    # At most two requests' images decode at once, two at a time: 16-bit images are the
    # largest per pixel (2 bytes, an 8-bit copy, Pillow's own buffer).
    report.assert_bounds(rss_growth_mb=700)
