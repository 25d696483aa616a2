"""End to end: `detr-serve --model x.pt` (an Ultralytics RT-DETR checkpoint) on a real port, through
the process split: the same boxes as Ultralytics' `model.predict`, several images in one batch,
tiling and /v1/render."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from scripts.bench.serverproc import RunningServer
from tests.ultralytics.conftest import UltralyticsCase, assert_parity

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(ultralytics_case: UltralyticsCase) -> Iterator[RunningServer]:
    srv = RunningServer(
        [
            "--model",
            str(ultralytics_case.checkpoint),
            "--backend",
            "torch",
            "--workers",
            "1",
            "--max-batch-size",
            "4",
            "--max-batch-delay-ms",
            "50",
            "--request-timeout-s",
            "300",
        ],
        ready_timeout_s=300,
    )
    yield srv
    srv.stop()


def _images(data: list[bytes]) -> list[dict[str, str]]:
    return [{"data": base64.b64encode(d).decode()} for d in data]


def test_detect_matches_ultralytics_predict_in_one_batch(
    server: RunningServer, ultralytics_case: UltralyticsCase
) -> None:
    body = {"images": _images(ultralytics_case.images), "threshold": 0.25, "max_detections": 300}
    r = httpx.post(server.url + "/v1/detect", json=body, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "rtdetr-l-random"
    results = answer["results"]
    assert len(results) == len(ultralytics_case.references)
    for result, want, data in zip(
        results, ultralytics_case.references, ultralytics_case.images, strict=True
    ):
        width, height = Image.open(io.BytesIO(data)).size
        assert (result["width"], result["height"]) == (width, height)
        assert result["timings"]["batch_size"] == len(results)  # one forward pass for all
        assert_parity(result, want)


def test_models_describes_the_checkpoint(server: RunningServer) -> None:
    r = httpx.get(server.url + "/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    text = r.text
    assert "rtdetr-l-random" in text
    assert "RTDETRDetectionModel (Ultralytics checkpoint" in text


def test_tiling_runs_on_the_checkpoint(
    server: RunningServer, ultralytics_case: UltralyticsCase
) -> None:
    data = ultralytics_case.images[1]  # 800 x 600
    tiling = {"tile_size": 640, "overlap": 0.2, "full_image": True}
    body = {"images": _images([data]), "tiling": tiling, "threshold": 0.25}
    r = httpx.post(server.url + "/v1/detect", json=body, timeout=300)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["timings"]["tiles"] >= 2  # tiles of 640 over 800 x 600, and the whole image
    boxes = np.array([d["box"] for d in result["detections"]]).reshape(-1, 4)
    assert len(boxes) > 0
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 800).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 600).all()


def test_render_draws_the_checkpoint_detections(
    server: RunningServer, ultralytics_case: UltralyticsCase
) -> None:
    data = ultralytics_case.images[0]
    body = {"images": _images([data]), "threshold": 0.25, "format": "png"}
    r = httpx.post(server.url + "/v1/render", json=body, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    drawn = np.array(Image.open(io.BytesIO(r.content)).convert("RGB"))
    original = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    assert drawn.shape == original.shape
    assert (drawn != original).any(axis=-1).sum() > 100  # the boxes are drawn
