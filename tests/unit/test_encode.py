"""Answers encoded straight from the arrays: /v1 JSON (rounded as /v1 always was) and v2
tensors (the engine's float32 values, not /v1's rounded numbers)."""

from __future__ import annotations

import numpy as np
import orjson

from app.api.kserve.tensors import v2_tensors
from app.api.v1.encode import v1_json
from app.api.v1.protocol import DetectResponse
from app.engine.tasks import ImageDetections
from app.service import AnsweredImage, DetectResult

LABELS = {0: "circle", 1: "square"}


def _result() -> DetectResult:
    det = ImageDetections(
        scores=np.float32([0.987654321, 0.5123456]),
        labels=np.int64([1, 0]),
        boxes=np.float32([[1.23456, 2.5, 30.987, 40.0], [0, 0, 10.004, 20.006]]),
        batch_size=2,
        inference_s=0.01,
        postprocess_s=0.001,
    )
    empty = ImageDetections(
        np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), 2, 0.01, 0.0
    )
    timings = {"fetch_ms": 0.0, "decode_ms": 1.0, "queue_ms": 2.0, "inference_ms": 10.0,
               "postprocess_ms": 1.0, "batch_size": 2}  # fmt: skip
    return DetectResult(
        "m", [AnsweredImage(64, 48, det, timings), AnsweredImage(8, 8, empty, timings)]
    )


def test_v1_json_matches_the_documented_schema_with_rounded_numbers() -> None:
    body = orjson.loads(v1_json(_result(), LABELS))
    DetectResponse.model_validate(body)  # the OpenAPI document's shape
    first, second = body["results"]
    assert (first["width"], first["height"]) == (64, 48)
    assert first["detections"] == [
        {"label": "square", "class_id": 1, "score": 0.98765, "box": [1.23, 2.5, 30.99, 40.0]},
        {"label": "circle", "class_id": 0, "score": 0.51235, "box": [0.0, 0.0, 10.0, 20.01]},
    ]
    assert second["detections"] == []
    assert first["timings"]["batch_size"] == 2


def test_v2_tensors_keep_the_float32_values_and_pad() -> None:
    tensors = v2_tensors(_result(), max_detections=3)
    assert tensors["boxes"].dtype == np.float32 and tensors["boxes"].shape == (2, 3, 4)
    np.testing.assert_array_equal(tensors["scores"][0, :2], np.float32([0.987654321, 0.5123456]))
    np.testing.assert_array_equal(tensors["boxes"][0, 0], np.float32([1.23456, 2.5, 30.987, 40]))
    assert tensors["labels"].tolist() == [[1, 0, -1], [-1, -1, -1]]
    assert tensors["num_detections"].tolist() == [2, 0]
    assert not tensors["boxes"][1].any() and not tensors["scores"][0, 2]


def test_v2_tensors_cut_at_max_detections() -> None:
    tensors = v2_tensors(_result(), max_detections=1)
    assert tensors["num_detections"].tolist() == [1, 0]
    assert tensors["labels"].tolist() == [[1], [-1]]
