"""A model on the CPU gets every image at its input size: the decode worker resizes it with Pillow
(as the model's own image processor does), the engine does no float resize, and the answer is the
one the full-size pixels give."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.engine.pipeline import Engine
from app.engine.tasks import DetectionTask, ImageDetections
from tests.api.conftest import CountingEngine, b64
from tests.conftest import shapes_image


class RecordingEngine(CountingEngine):
    """The real engine, keeping the pixels' shape and the original size of each task."""

    seen: list[tuple[tuple[int, ...], tuple[int, int] | None]] = []

    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageDetections]:
        type(self).seen += [
            (tuple(t.pixels.shape) if t.pixels is not None else (), t.source_size) for t in tasks
        ]
        return super().run_batch(tasks)


def _serve_with(monkeypatch, engine_class: type[CountingEngine]) -> None:  # noqa: ANN001
    """client_factory loads `engine_class` instead of CountingEngine."""
    load = Engine.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        CountingEngine, "load", classmethod(lambda _, *a, **k: load(engine_class, *a, **k))
    )


async def _detect(client, image: bytes) -> dict:  # noqa: ANN001
    r = await client.post(
        "/v1/detect",
        json={"images": [{"data": b64(image)}], "threshold": 0.0, "max_detections": 10},
    )
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    return result


async def test_a_small_image_reaches_a_cpu_engine_at_the_model_input_size(
    client_factory, monkeypatch
) -> None:
    _serve_with(monkeypatch, RecordingEngine)
    client, engine = await client_factory()
    assert isinstance(engine, RecordingEngine)
    RecordingEngine.seen = []
    image = shapes_image(320, 240)
    result = await _detect(client, image)
    # The tiny checkpoint's input is 128x128; the boxes stay in the 320x240 original's pixels.
    assert RecordingEngine.seen == [((128, 128, 3), (240, 320))]
    assert (result["width"], result["height"]) == (320, 240)

    # The same detections as the full-size pixels resized by the engine (which reproduces
    # Pillow's resize in torch, to within a level on a few pixels).
    full = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
    (expected,) = engine.run_batch([DetectionTask(full, 0.0, 10)])
    assert isinstance(expected, ImageDetections)
    got_boxes = np.array([d["box"] for d in result["detections"]])
    got_scores = np.array([d["score"] for d in result["detections"]])
    assert [d["class_id"] for d in result["detections"]] == expected.labels.tolist()
    np.testing.assert_allclose(got_scores, expected.scores, atol=2e-3)
    np.testing.assert_allclose(got_boxes, expected.boxes, atol=1.0)


async def test_the_decode_worker_resize_is_pillows_own(client_factory, monkeypatch) -> None:
    """What the engine receives is exactly Pillow's bilinear resize of the decoded image."""
    captured: list[np.ndarray] = []

    class Capturing(CountingEngine):
        def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageDetections]:
            captured.extend(np.array(t.pixels) for t in tasks if t.pixels is not None)
            return super().run_batch(tasks)

    _serve_with(monkeypatch, Capturing)
    client, _ = await client_factory()
    captured.clear()
    image = shapes_image(300, 200, "PNG")
    await _detect(client, image)
    (pixels,) = captured
    reference = Image.open(io.BytesIO(image)).convert("RGB").resize((128, 128), 2)
    assert np.array_equal(pixels, np.asarray(reference))
