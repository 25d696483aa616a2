"""Bodies and answers for the v2 protocol's unit tests, built by tritonclient's own encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from app.api.kserve.request import parse_infer_request
from app.engine.tasks import ImageDetections
from app.errors import InvalidRequestError
from app.service import AnsweredImage

MAX_IMAGES = 16


def triton_body(
    images: list[bytes],
    *,
    binary: bool = True,
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    parameters: dict | None = None,
    request_id: str = "",
) -> tuple[bytes, str | None]:
    """The request body and Inference-Header-Content-Length that tritonclient would send."""
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, parameters=parameters, request_id=request_id
    )
    return body, None if header_length is None else str(header_length)


def json_body(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def images_input(**overrides: object) -> dict:
    return {"name": "images", "shape": [1], "datatype": "BYTES", "data": ["abc"]} | overrides


def result(*dets: tuple[int, float, list[float]]) -> AnsweredImage:
    detections = ImageDetections(
        scores=np.array([s for _, s, _ in dets], dtype=np.float32),
        labels=np.array([c for c, _, _ in dets], dtype=np.int64),
        boxes=np.array([box for _, _, box in dets], dtype=np.float32).reshape(-1, 4),
        batch_size=1,
        inference_s=0.0,
        postprocess_s=0.0,
    )
    return AnsweredImage(width=100, height=80, detections=detections, timings={})


def rejects(body: bytes, header_length: str | None, text: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_infer_request(body, header_length, MAX_IMAGES)
    assert caught.value.status_code == 400
    assert text in caught.value.message, caught.value.message
