"""The null engine (--backend null): no model; every image gets one fixed detection.

It measures the serving path alone (HTTP, parsing, the front-end/engine boundary, batching,
encoding): scripts/bench/bench.py --overhead runs it against a bare FastAPI endpoint. It takes JPEGs
encoded, as the GPU path does (nvjpeg), so the front end only checks their headers: what is
left is the ceiling a GPU engine meets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.config import Settings
from app.engine.tasks import DetectionTask, ImageDetections, ImageResult, ModelInfo


class NullEngine:
    # Not a decoder: any non-None value tells the front ends to send plain JPEGs encoded.
    jpeg_decoder = "none (null engine)"

    def __init__(self, info: ModelInfo, batch_s: float = 0.0) -> None:
        self.info = info
        self.batch_s = batch_s  # a stand-in for a forward pass's time

    @classmethod
    def from_settings(cls, settings: Settings) -> NullEngine:
        config = json.loads((Path(settings.model) / "config.json").read_text())
        labels = {int(k): str(v) for k, v in (config.get("id2label") or {"0": "object"}).items()}
        archs = config.get("architectures") or [config.get("model_type", "unknown")]
        info = ModelInfo(
            name=settings.served_model_name,
            backend="null",
            device="cpu",
            dtype="none",
            labels=labels,
            architecture=str(archs[0]),
        )
        return cls(info, settings.null_batch_ms / 1e3)

    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageResult]:
        if self.batch_s:
            time.sleep(self.batch_s)
        results: list[ImageResult] = []
        for task in tasks:
            height, width = task.size
            box = np.array([[0.1 * width, 0.1 * height, 0.5 * width, 0.5 * height]], np.float32)
            results.append(
                ImageDetections(
                    scores=np.array([0.9], np.float32),
                    labels=np.zeros(1, np.int64),
                    boxes=box,
                    batch_size=len(tasks),
                    inference_s=0.0,
                    postprocess_s=0.0,
                )
            )
        return results

    def memory_usage(self) -> list[tuple[str, str, float]]:
        return []
