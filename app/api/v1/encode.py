"""Answers straight from the post-processed arrays: the /v1 JSON body (orjson). No pydantic
object per detection (v2's output tensors: app/api/kserve/tensors.py).
app/api/v1/protocol.py documents the /v1 shape.
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
