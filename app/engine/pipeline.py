"""The engine: decode, pre-process, run the backend, post-process, on batches.

It is the batcher's handler: one call per batch, on a worker thread. A batch goes through three
stages, each behind a lock of its own, so that batches in flight on one device overlap: with two
(the default on CUDA, `--batches-in-flight`), batch k+1 is decoded and pre-processed (prepare)
while batch k runs on the device (compute) or its detections come back to the host (finish).
On CUDA each stage runs on a stream of its own, so the overlap happens on the GPU too, not only
between Python threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from app.backends.base import Backend
from app.backends.torch_backend import TorchBackend
from app.engine.buckets import BatchBuckets, pad_rows
from app.engine.postprocess import BatchDetections, Postprocessor, PostprocessSpec, select
from app.engine.preprocess import Preprocessor
from app.engine.preprocess_spec import PreprocessSpec
from app.engine.tasks import (
    DetectionTask,
    DeviceOutOfMemoryError,
    ImageDetections,
    ImageResult,
    ModelInfo,
)
from app.errors import ApiError
from app.images.device import ImageDecoder, PillowDecoder
from app.models.ultralytics import UltralyticsCheckpoint

logger = logging.getLogger(__name__)


@dataclass
class PreparedBatch:
    """A batch after the prepare stage: the model's input on the device, ready at `ready`."""

    size: int  # images handed over, failed ones included
    rows: list[int]  # positions (in the batch handed over) of the images that reach the model
    failures: dict[int, ApiError]  # images that could not be decoded
    tasks: list[DetectionTask]  # the tasks at `rows`
    pixel_values: torch.Tensor | None
    pixel_mask: torch.Tensor | None
    started: float
    ready: torch.cuda.Event | None = None


@dataclass
class ComputedBatch:
    logits: torch.Tensor
    pred_boxes: torch.Tensor
    ready: torch.cuda.Event | None = None


@dataclass
class _Stage:
    """One stage of the pipeline: a lock (one batch at a time) and, on CUDA, a stream."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        with self.lock:
            if self.stream is None:
                yield
            else:
                with torch.cuda.stream(self.stream):
                    yield


class Engine:
    def __init__(
        self,
        backend: Backend,
        preprocessor: Preprocessor,
        postprocessor: Postprocessor,
        info: ModelInfo,
        *,
        buckets: BatchBuckets | None = None,
        decoder: ImageDecoder | None = None,
    ) -> None:
        self.backend = backend
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.info = info
        self.num_classes = len(info.labels)
        self.buckets = buckets  # None: every batch runs at its own size
        # None: Pillow (app/images/device.py), and the front ends decode every image.
        self.decoder = decoder if decoder is not None else PillowDecoder(backend.device)
        device = backend.device
        self._stages = [_Stage() for _ in range(3)]
        if device.type == "cuda":
            for stage in self._stages:
                stage.stream = torch.cuda.Stream(device)
        self._prepare_stage, self._compute_stage, self._finish_stage = self._stages

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        name: str,
        device: str = "auto",
        dtype: str = "auto",
        backend: str = "torch",
        msda_kernel: bool = True,
        onnx_path: Path | None = None,
        onnx_spinning: bool = False,
    ) -> Engine:
        """backend: "torch" (eager transformers model; msda_kernel swaps its deformable
        attention for detr-serve's op) or "onnx" (onnx_path, default MODEL_DIR/model.onnx, in
        onnxruntime). An Ultralytics RT-DETR checkpoint (a .pt file) loads through
        app/models/ultralytics.py instead of transformers."""
        from app.models.ultralytics import probe

        checkpoint = probe(model_dir)
        if checkpoint is not None:
            return cls._load_ultralytics(
                checkpoint,
                name=name,
                device=device,
                dtype=dtype,
                backend=backend,
                msda_kernel=msda_kernel,
                onnx_path=onnx_path,
                onnx_spinning=onnx_spinning,
            )
        config = AutoConfig.from_pretrained(model_dir)
        runner: Backend
        if backend == "onnx":
            from app.backends.onnx_backend import OnnxBackend

            runner = OnnxBackend.load(
                model_dir, device=device, dtype=dtype, path=onnx_path, spinning=onnx_spinning
            )
        elif backend == "torch":
            runner = TorchBackend.load(
                model_dir, device=device, dtype=dtype, msda_kernel=msda_kernel
            )
        else:
            raise ValueError(f"backend {backend!r} is not one of torch, onnx")
        labels = {int(k): str(v) for k, v in config.id2label.items()}
        info = ModelInfo(
            name=name,
            backend=runner.name,
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            labels=labels,
            architecture=_architecture(model_dir),
        )
        return cls(
            runner,
            Preprocessor(PreprocessSpec.from_dir(model_dir), runner.device, runner.dtype),
            Postprocessor(PostprocessSpec.from_config(config)),
            info,
        )

    @classmethod
    def _load_ultralytics(
        cls,
        checkpoint: UltralyticsCheckpoint,
        *,
        name: str,
        device: str,
        dtype: str,
        backend: str,
        msda_kernel: bool,
        onnx_path: Path | None,
        onnx_spinning: bool,
    ) -> Engine:
        runner: Backend
        if backend == "onnx":
            from app.backends.onnx_backend import OnnxBackend
            from app.backends.ultralytics import installed_postprocess_spec

            onnx_runner = OnnxBackend.load(
                checkpoint.path.parent,
                device=device,
                dtype=dtype,
                path=onnx_path,
                spinning=onnx_spinning,
            )
            # The export holds the decoder's raw outputs: the selection is the installed
            # Ultralytics version's, as with torch.
            post = installed_postprocess_spec(onnx_runner.num_queries)
            runner = onnx_runner
        elif backend == "torch":
            runner, post = checkpoint.load(device=device, dtype=dtype, msda_kernel=msda_kernel)
        else:
            raise ValueError(f"backend {backend!r} is not one of torch, onnx")
        info = ModelInfo(
            name=name,
            backend=runner.name,
            device=str(runner.device),
            dtype=str(runner.dtype).removeprefix("torch."),
            labels=dict(checkpoint.labels),
            architecture=checkpoint.architecture,
        )
        return cls(
            runner,
            Preprocessor(checkpoint.preprocess_spec(), runner.device, runner.dtype),
            Postprocessor(post),
            info,
        )

    # -- the batcher's handler ----------------------------------------------------------------
    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageResult]:
        """Detect in a batch. On device out-of-memory the batch is split in halves and retried;
        an image that does not fit even alone gets a DeviceOutOfMemoryError of its own, and an
        image that cannot be decoded its InvalidImageError."""
        try:
            prepared = self.prepare(tasks)
            if prepared.pixel_values is None:
                return self._assemble(prepared, [])
            return self.finish(prepared, self.compute(prepared))
        except torch.OutOfMemoryError:
            if self.backend.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(tasks) == 1:
                logger.error("out of device memory on a batch of one image")
                return [DeviceOutOfMemoryError("the device ran out of memory for this image")]
            half = len(tasks) // 2
            logger.warning("out of device memory on a batch of %d; retrying in halves", len(tasks))
            return self.run_batch(tasks[:half]) + self.run_batch(tasks[half:])

    # -- the three stages ---------------------------------------------------------------------
    def prepare(self, tasks: Sequence[DetectionTask]) -> PreparedBatch:
        """Decode (JPEGs on the device), copy to the device, resize and normalise."""
        with self._prepare_stage.enter():
            started = time.perf_counter()
            images = self.decoder.to_device([t.image for t in tasks])
            failures = {i: e for i, e in enumerate(images) if isinstance(e, ApiError)}
            rows = [i for i in range(len(tasks)) if i not in failures]
            prepared = PreparedBatch(
                size=len(tasks),
                rows=rows,
                failures=failures,
                tasks=[tasks[i] for i in rows],
                pixel_values=None,
                pixel_mask=None,
                started=started,
            )
            if rows:
                prepared.pixel_values, prepared.pixel_mask = self.preprocessor(
                    [image for image in images if not isinstance(image, ApiError)],
                    [tasks[i].size for i in rows],
                )
                prepared.ready = self._record(self._prepare_stage)
            return prepared

    def compute(self, prepared: PreparedBatch) -> ComputedBatch:
        """The forward pass, padded to the batch's bucket; on CUDA this only enqueues it."""
        pixel_values, pixel_mask = prepared.pixel_values, prepared.pixel_mask
        assert pixel_values is not None
        with self._compute_stage.enter():
            self._wait(self._compute_stage, prepared.ready, pixel_values, pixel_mask)
            n = pixel_values.shape[0]
            rows = self.buckets.bucket_for(n) if self.buckets is not None else n
            if rows != n:
                pixel_values = pad_rows(pixel_values, rows)
                # Padding rows count as all-valid pixels: a fully masked image is not a case
                # every model handles, and these rows are dropped anyway.
                pixel_mask = None if pixel_mask is None else pad_rows(pixel_mask, rows, 1)
            infer = self.backend.infer
            # A batch of tiles only: a backend may run it its own way (onnxruntime on the
            # CPU: spinning threads, app/backends/onnx_backend.py).
            if prepared.tasks and all(t.tile for t in prepared.tasks):
                infer = getattr(self.backend, "infer_tiles", infer)
            raw = infer(pixel_values, pixel_mask)
            if raw.logits.shape[0] != rows:
                raise RuntimeError(f"the model returned {raw.logits.shape[0]} rows for {rows}")
            return ComputedBatch(
                raw.logits[:n], raw.pred_boxes[:n], self._record(self._compute_stage)
            )

    def finish(self, prepared: PreparedBatch, computed: ComputedBatch) -> list[ImageResult]:
        """Post-process on the device, one copy to the host, then each image's selection."""
        with self._finish_stage.enter():
            if computed.ready is not None:
                # The forward pass ends here, not when it was enqueued.
                computed.ready.synchronize()
            inferred = time.perf_counter()
            self._wait(self._finish_stage, computed.ready, computed.logits, computed.pred_boxes)
            tasks = prepared.tasks
            device = computed.logits.device
            dets = self.postprocessor(
                computed.logits,
                computed.pred_boxes,
                torch.tensor([t.size for t in tasks]).to(device),
                self._class_masks(tasks, computed.logits.shape[-1], device),
            )
            results = []
            for i, task in enumerate(tasks):
                scores, labels, boxes = select(dets, i, task.threshold, task.max_detections)
                # transformers leaves boxes unclipped; clients expect them inside the image.
                height, width = task.size
                np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
                np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
                results.append((scores, labels, boxes))
            done = time.perf_counter()
            detections = [
                ImageDetections(s, lab, b, len(tasks), inferred - prepared.started, done - inferred)
                for s, lab, b in results
            ]
            return self._assemble(prepared, detections)

    def normalized_detections(self, tasks: Sequence[DetectionTask]) -> BatchDetections:
        """Every top-k candidate of each image, boxes in [0, 1] coordinates: what the precision
        check at start-up compares between dtypes."""
        prepared = self.prepare(tasks)
        if prepared.pixel_values is None:
            raise ValueError("none of the images could be decoded")
        computed = self.compute(prepared)
        with self._finish_stage.enter():
            self._wait(self._finish_stage, computed.ready, computed.logits, computed.pred_boxes)
            device = computed.logits.device
            ones = torch.ones((len(prepared.tasks), 2), device=device)
            return self.postprocessor(computed.logits, computed.pred_boxes, ones)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _record(stage: _Stage) -> torch.cuda.Event | None:
        if stage.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stage.stream)
        return event

    @staticmethod
    def _wait(stage: _Stage, ready: torch.cuda.Event | None, *tensors: torch.Tensor | None) -> None:
        """Make `stage` wait for the work that produced `tensors` on another stream, and tell
        the caching allocator that they are used here (else it could hand their memory out
        again while this stream still reads it)."""
        if stage.stream is None or ready is None:
            return
        stage.stream.wait_event(ready)
        for tensor in tensors:
            if tensor is not None:
                tensor.record_stream(stage.stream)

    @staticmethod
    def _assemble(prepared: PreparedBatch, detections: list[ImageDetections]) -> list[ImageResult]:
        results: list[ImageResult | None] = [None] * prepared.size
        for row, det in zip(prepared.rows, detections, strict=True):
            results[row] = det
        for row, error in prepared.failures.items():
            results[row] = error
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

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

    @property
    def jpeg_on_device(self) -> bool:
        """Whether the front ends should send plain JPEGs encoded (the decoder is nvjpeg)."""
        return self.decoder.jpeg_on_device

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
        """Run dummy batches of each size through every stage, so that the first requests pay
        for no lazy initialisation (allocator, kernels, autotuning, the JPEG decoder)."""
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8)
        jpeg = self.decoder.warmup_jpeg(pixels)
        for step, size in enumerate(batch_sizes, 1):
            started = time.perf_counter()
            self.run_batch([DetectionTask(pixels, 0.5, 10)] * size)
            if jpeg is not None:
                self.run_batch([DetectionTask(None, 0.5, 10, jpeg=jpeg)] * size)
            logger.info(
                "warm-up %d/%d on %s: batch %d in %.1f ms",
                step,
                len(batch_sizes),
                self.backend.device,
                size,
                (time.perf_counter() - started) * 1e3,
            )


def _architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return str(archs[0])
