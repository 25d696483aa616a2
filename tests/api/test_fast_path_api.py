"""The GPU fast path's request side, on the CPU: JPEGs stay encoded until the engine decodes
them in a batch (a Pillow stand-in plays nvjpeg), with the same answers as the Pillow path;
batches in flight per device follow the setting."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.engine.backend_choice import choose_backend
from app.engine.pipeline import Engine
from app.images.device import DeviceJpegDecoder
from app.main import create_app
from tests.api.conftest import assert_error, make_settings
from tests.conftest import shapes_image


class StandInDecoder(DeviceJpegDecoder):
    """nvjpeg's role played by Pillow on the CPU; counts the images it decoded."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), self._decode)
        self.images = 0

    def _decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        out = []
        for encoded in data:
            img = Image.open(io.BytesIO(encoded.numpy().tobytes()))
            img.load()
            out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        self.images += len(out)
        return out


@pytest.fixture
async def serve(tiny_model_dir: Path) -> AsyncIterator[Any]:
    lifespans = []

    async def start(
        decoder: DeviceJpegDecoder | None = None, backend: str = "torch", **overrides: Any
    ) -> Any:
        settings = make_settings(tiny_model_dir, **overrides)
        onnx_path = None
        if backend == "onnx":  # the session cache's export (tests/conftest.py)
            choice = choose_backend(settings.model_copy(update={"backend": "auto"}), "cpu")
            onnx_path = choice.onnx_path
        engine = Engine.load(
            settings.model, name="tiny", device="cpu", backend=backend, onnx_path=onnx_path
        )
        engine.jpeg_decoder = decoder
        app = create_app(settings, engine=engine)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await app.state.runtime.wait_ready()
        lifespans.append(lifespan)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
        return app, client

    yield start
    for lifespan in reversed(lifespans):
        await lifespan.__aexit__(None, None, None)


async def detect(client: httpx.AsyncClient, *images: bytes) -> httpx.Response:
    files = [("file", (f"{i}.img", data)) for i, data in enumerate(images)]
    return await client.post("/v1/detect", files=files, data={"threshold": "0.0"})


async def test_jpegs_decoded_by_the_engine_answer_like_pillow_decoded_ones(serve) -> None:
    jpeg, png = shapes_image(320, 240), shapes_image(200, 150, "PNG")
    _, pillow_client = await serve()
    expected = (await detect(pillow_client, jpeg, png)).json()["results"]
    decoder = StandInDecoder()
    _, device_client = await serve(decoder)
    decoder.images = 0  # forget the warm-up
    response = await detect(device_client, jpeg, png)
    assert response.status_code == 200, response.text
    got = response.json()["results"]
    assert decoder.images == 1  # the JPEG; the PNG was decoded by Pillow on the request path
    for a, b in zip(got, expected, strict=True):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert [d["box"] for d in a["detections"]] == [d["box"] for d in b["detections"]]


async def test_a_jpeg_corrupt_past_its_header_is_refused_naming_the_image(serve) -> None:
    _, client = await serve(StandInDecoder())
    jpeg = shapes_image(320, 240)
    response = await detect(client, jpeg, jpeg[: len(jpeg) // 2])
    assert_error(response, 400, "invalid_image", "image 1: the JPEG data is corrupt or truncated")


@pytest.mark.parametrize(
    ("backend", "setting", "expected", "only_full"),
    [
        ("torch", None, 1, False),
        ("onnx", None, 2, True),
        ("torch", 2, 2, False),
        ("onnx", 1, 1, False),
        ("onnx", 2, 2, False),
    ],
)
async def test_batches_in_flight_on_the_cpu_by_backend_and_as_set(
    serve, backend: str, setting: int | None, expected: int, only_full: bool
) -> None:
    """On the CPU by default: one batch in flight with torch; with onnxruntime a second one,
    handed over only when full (tiles, a saturated queue). A set value is taken as it is."""
    if backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    app, client = await serve(backend=backend, batches_in_flight=setting)
    runtime = app.state.runtime
    assert runtime.pool.info.backend == backend
    assert runtime.pool.max_concurrent_batches == expected
    assert runtime.host._executor._max_workers == expected
    assert runtime.host.batcher.ahead_only_full is only_full
    assert (await detect(client, shapes_image())).status_code == 200
