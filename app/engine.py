"""The engine: pre-process a batch of decoded images, run the backend, post-process.

It is the batcher's handler: one call per batch, on the device's worker thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from app.backends.base import Backend
from app.backends.torch_backend import TorchBackend
from app.processing import Postprocessor, PostprocessSpec, Preprocessor, PreprocessSpec, select

logger = logging.getLogger(__name__)


class DeviceOutOfMemoryError(RuntimeError):
    """One image did not fit on the device even in a batch of its own."""


@dataclass(frozen=True)
class DetectionTask:
    """One image waiting for the model, with the options of its request."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    threshold: float
    max_detections: int
    class_ids: frozenset[int] | None = None


@dataclass(frozen=True)
class ImageDetections:
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K]
    boxes: np.ndarray  # float32 [K, 4], xyxy in the original image's pixels
    batch_size: int
    inference_s: float
    postprocess_s: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    device: str
    dtype: str
    labels: dict[int, str]
    architecture: str


class Engine:
    def __init__(
        self,
        backend: Backend,
        preprocessor: Preprocessor,
        postprocessor: Postprocessor,
        info: ModelInfo,
    ) -> None:
        self.backend = backend
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.info = info
        self.num_classes = len(info.labels)

    @classmethod
    def load(
        cls, model_dir: Path, *, name: str, device: str = "auto", dtype: str = "auto"
    ) -> Engine:
        config = AutoConfig.from_pretrained(model_dir)
        backend = TorchBackend.load(model_dir, device=device, dtype=dtype)
        labels = {int(k): str(v) for k, v in config.id2label.items()}
        info = ModelInfo(
            name=name,
            backend=backend.name,
            device=str(backend.device),
            dtype=str(backend.dtype).removeprefix("torch."),
            labels=labels,
            architecture=_architecture(model_dir),
        )
        return cls(
            backend,
            Preprocessor(PreprocessSpec.from_dir(model_dir), backend.device, backend.dtype),
            Postprocessor(PostprocessSpec.from_config(config)),
            info,
        )

    def run_batch(
        self, tasks: Sequence[DetectionTask]
    ) -> list[ImageDetections | DeviceOutOfMemoryError]:
        """Detect in a batch. On device out-of-memory the batch is split in halves and retried;
        an image that does not fit even alone gets a DeviceOutOfMemoryError of its own."""
        try:
            return list(self._run(tasks))
        except torch.OutOfMemoryError:
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(tasks) == 1:
                logger.error("out of device memory on a batch of one image")
                return [DeviceOutOfMemoryError("the device ran out of memory for this image")]
            half = len(tasks) // 2
            logger.warning("out of device memory on a batch of %d; retrying in halves", len(tasks))
            return self.run_batch(tasks[:half]) + self.run_batch(tasks[half:])

    def _run(self, tasks: Sequence[DetectionTask]) -> list[ImageDetections]:
        started = time.perf_counter()
        device = self.backend.device
        images = [torch.from_numpy(t.pixels).permute(2, 0, 1) for t in tasks]
        orig_sizes = torch.tensor([[t.pixels.shape[0], t.pixels.shape[1]] for t in tasks])
        pixel_values, pixel_mask = self.preprocessor(images)
        raw = self.backend.infer(pixel_values, pixel_mask)
        if raw.logits.shape[0] != len(tasks):
            raise RuntimeError(f"the model returned {raw.logits.shape[0]} rows for {len(tasks)}")
        inferred = time.perf_counter()
        dets = self.postprocessor(
            raw.logits.float(),
            raw.pred_boxes.float(),
            orig_sizes.to(device),
            self._class_masks(tasks, raw.logits.shape[-1], device),
        )
        results = []
        for i, task in enumerate(tasks):
            scores, labels, boxes = select(dets, i, task.threshold, task.max_detections)
            # transformers leaves boxes unclipped; clients expect them inside the image.
            height, width = task.pixels.shape[:2]
            np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
            np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
            results.append((scores, labels, boxes))
        done = time.perf_counter()
        return [
            ImageDetections(s, lab, b, len(tasks), inferred - started, done - inferred)
            for s, lab, b in results
        ]

    def _class_masks(
        self, tasks: Sequence[DetectionTask], num_logits: int, device: torch.device
    ) -> torch.Tensor | None:
        if all(t.class_ids is None for t in tasks):
            return None
        masks = torch.ones((len(tasks), num_logits), dtype=torch.bool)
        for i, task in enumerate(tasks):
            if task.class_ids is not None:
                masks[i] = False
                masks[i, sorted(c for c in task.class_ids if c < num_logits)] = True
        return masks.to(device)

    def memory_usage(self) -> list[tuple[str, str, float]]:
        """(device, kind, bytes) for the metrics: CUDA allocator figures, or RSS on the CPU."""
        device = self.backend.device
        if device.type == "cuda":
            return [
                (str(device), "allocated", float(torch.cuda.memory_allocated(device))),
                (str(device), "reserved", float(torch.cuda.memory_reserved(device))),
            ]
        import resource

        # ru_maxrss is the peak; the current RSS comes from /proc where it exists.
        try:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * resource.getpagesize()
        except OSError:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return [(str(device), "rss", float(rss))]

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run dummy batches so the first requests do not pay for lazy initialisation."""
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            pixels = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
            started = time.perf_counter()
            self.run_batch([DetectionTask(pixels, 0.5, 10)] * size)
            logger.info("warm-up batch %d: %.1f ms", size, (time.perf_counter() - started) * 1e3)


def _architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(archs[0])
