"""Answers straight from the post-processed arrays: the /v1 JSON body (orjson) and the v2
output tensors. No pydantic object per detection, and v2 keeps the engine's float32 values
(no trip through /v1's rounded JSON numbers). app/api/v1/protocol.py still documents the /v1 shape.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson

from app.service import DetectResult


def v1_json(result: DetectResult, labels: dict[int, str]) -> bytes:
    """The DetectResponse body: scores to 5 decimals, boxes to 2, as /v1 always answered."""
    results = []
    for image in result.images:
        det = image.detections
        class_ids = det.labels.tolist()
        scores = np.round(det.scores.astype(np.float64), 5).tolist()
        boxes = np.round(det.boxes.astype(np.float64), 2).tolist()
        answer = {
            "width": image.width,
            "height": image.height,
            "detections": [
                {
                    "label": labels.get(c, str(c)),
                    "class_id": c,
                    "score": score,
                    "box": box,
                }
                for c, score, box in zip(class_ids, scores, boxes, strict=True)
            ],
            "timings": image.timings,
        }
        if image.rendered is not None:
            answer["image"] = base64.b64encode(image.rendered).decode("ascii")
        results.append(answer)
    return orjson.dumps({"model": result.model, "results": results})


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
