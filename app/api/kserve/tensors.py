"""The served model's v2 tensors: the input and outputs as the protocol describes them, the
answer of a request as output tensors (straight from the arrays, float32 as the engine made
them), and the server and model metadata built from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.api.kserve.protocol import MODEL_VERSION
from app.errors import UnknownModelError
from app.service import DetectResult

EXTENSIONS = ["binary_tensor_data"]
INPUT_NAME = "images"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype, little-endian, as the binary extension sends it
    description: str


INPUT = TensorSpec(
    INPUT_NAME,
    "BYTES",
    (-1,),
    "object",
    "Encoded images (JPEG, PNG, WebP, BMP, GIF, TIFF), one element per image; shape [N] "
    "(or [N, 1]). Send them with the binary tensor data extension, or over JSON as base64 "
    "text: an element that does not start like an image and is valid base64 is decoded "
    "(JSON strings are UTF-8 text, which encoded images almost never are).",
)
OUTPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec(
            "boxes",
            "FP32",
            (-1, -1, 4),
            "<f4",
            "[N, K, 4] boxes as [x1, y1, x2, y2] in each original image's pixels; padding rows "
            "are 0.",
        ),
        TensorSpec(
            "scores",
            "FP32",
            (-1, -1),
            "<f4",
            "[N, K] scores, best first; padding is 0.",
        ),
        TensorSpec(
            "labels",
            "INT64",
            (-1, -1),
            "<i8",
            "[N, K] class ids (see parameters.labels); padding is -1.",
        ),
        TensorSpec(
            "num_detections",
            "INT32",
            (-1,),
            "<i4",
            "[N] how many of the K rows of each image are real detections.",
        ),
    )
}

OUTPUTS_DESCRIPTION = (
    "K is the request's max_detections parameter (or the server's default): every image's "
    "detections fill the first num_detections rows of boxes, scores and labels, best first, "
    "and the rest is padding (score 0, label -1, box 0)."
)


def v2_tensors(result: DetectResult, max_detections: int) -> dict[str, np.ndarray]:
    """The detections of every image as fixed-shape tensors, padded to K = max_detections:
    boxes [N, K, 4] float32, scores [N, K] float32, labels [N, K] int64 (-1 where padded),
    num_detections [N] int32."""
    n, k = len(result.images), max_detections
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    scores = np.zeros((n, k), dtype=np.float32)
    labels = np.full((n, k), -1, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int32)
    for i, image in enumerate(result.images):
        det = image.detections
        m = min(k, len(det.scores))
        counts[i] = m
        boxes[i, :m] = det.boxes[:m]
        scores[i, :m] = det.scores[:m]
        labels[i, :m] = det.labels[:m]
    return {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": counts}


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "detr-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(
    *,
    name: str,
    backend: str,
    labels: Mapping[int, str],
    default_threshold: float,
    default_max_detections: int,
) -> dict[str, Any]:
    platform = {"torch": "pytorch_transformers", "onnx": "onnxruntime_onnx"}.get(backend, backend)
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": platform,
        "inputs": [_tensor_metadata(INPUT)],
        "outputs": [_tensor_metadata(spec) for spec in OUTPUTS.values()],
        "parameters": {
            "description": OUTPUTS_DESCRIPTION,
            "request_parameters": {
                "threshold": f"minimum score, 0..1 (default {default_threshold})",
                "max_detections": f"K, 1..1000 (default {default_max_detections})",
                "classes": "only these classes: comma-separated names or ids",
                "tiling": 'tiled inference: true, "auto", or the options object (or its JSON '
                "text): tile_size, overlap, full_image, merge, match_metric, "
                "match_threshold, class_agnostic, auto",
            },
            "labels": {str(i): labels[i] for i in sorted(labels)},
        },
    }


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": list(spec.shape),
        "parameters": {"description": spec.description},
    }


def check_model(served: str, name: str, version: str | None) -> None:
    """404 unless `name` (and `version`, when given) is the served model."""
    if name != served:
        raise UnknownModelError(f"unknown model {name!r}; this server serves {served!r}")
    if version is not None and version != MODEL_VERSION:
        raise UnknownModelError(
            f"unknown version {version!r} of model {name!r}; its only version is {MODEL_VERSION!r}"
        )
