"""One detection request's path: bytes (upload, base64, URL) -> decode -> engine -> results.

Everything a client could get wrong is checked here, before any image reaches the model. Where
the engines decode JPEGs on the GPU, a plain JPEG only has its header checked here and travels
on encoded; everything else is decoded with Pillow on a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from anyio import CapacityLimiter, to_thread

from app.batching import (
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from app.config import Settings
from app.engine.tasks import DetectionTask, DeviceOutOfMemoryError, ImageDetections, ModelInfo
from app.errors import (
    ApiError,
    DeadlineError,
    InferenceError,
    InvalidImageError,
    InvalidRequestError,
    QueueFullApiError,
    UnavailableError,
)
from app.fetch import Fetcher
from app.images import EncodedJpeg, decode_image, probe_plain_jpeg
from app.ipc.client import EngineUnavailableError
from app.metrics import Metrics
from app.schemas import DetectOptions

logger = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What the service needs of the model side: the in-process Batcher, or the RemoteEngine
    of a front-end worker (app/ipc/client.py). Both raise app.batching's errors."""

    @property
    def max_batch_size(self) -> int: ...

    async def submit(
        self, tasks: Sequence[DetectionTask], deadline: float
    ) -> list[ImageDetections]: ...


@dataclass(frozen=True)
class AnsweredImage:
    """One image's answer, as arrays: encoded to v1 JSON or v2 tensors by app/encode.py."""

    width: int
    height: int
    detections: ImageDetections
    timings: dict[str, float]


@dataclass(frozen=True)
class DetectResult:
    model: str
    images: list[AnsweredImage]


@dataclass(frozen=True)
class ImageSource:
    """One input image as the client gave it: raw bytes, base64 text or a URL."""

    raw: bytes | None = None
    base64: str | None = None
    url: str | None = None


# Headers of larger files are read on a worker thread: Pillow walks every marker before the
# frame header, and a hostile file can hold many (each up to 64 KB).
_INLINE_PROBE_BYTES = 1 << 20
# Larger base64 texts are decoded on a worker thread, in slices (see _b64decode).
_INLINE_BASE64_CHARS = 1 << 20
_BASE64_SLICE = 1 << 20  # a multiple of 4


@dataclass
class _Prepared:
    image: np.ndarray | EncodedJpeg  # uint8 [H, W, 3] pixels, or a JPEG for the device
    height: int
    width: int
    fetch_s: float
    decode_s: float

    def task(
        self, threshold: float, max_det: int, class_ids: frozenset[int] | None
    ) -> DetectionTask:
        if isinstance(self.image, EncodedJpeg):
            return DetectionTask(None, threshold, max_det, class_ids, jpeg=self.image)
        return DetectionTask(self.image, threshold, max_det, class_ids)


class DetectionService:
    def __init__(
        self,
        settings: Settings,
        info: ModelInfo,
        engine: EngineClient,
        fetcher: Fetcher,
        metrics: Metrics,
        *,
        jpeg_on_device: bool = False,
    ) -> None:
        self.settings = settings
        self.jpeg_on_device = jpeg_on_device
        self.info = info
        self.engine = engine
        self.fetcher = fetcher
        self.metrics = metrics
        # Decoding competes with the model for the same cores: more decode threads than cores
        # only adds switching (and stalls torch's parallel regions).
        self._decode_slots = CapacityLimiter(settings.decode_threads or os.cpu_count() or 1)
        self._ids_by_name = {name.lower(): cid for cid, name in info.labels.items()}

    async def detect(self, sources: Sequence[ImageSource], options: DetectOptions) -> DetectResult:
        arrived = time.monotonic()
        deadline = arrived + self.settings.request_timeout_s
        if not sources:
            raise InvalidRequestError("the request holds no image")
        limit = self.settings.max_images_per_request
        if len(sources) > limit:
            raise InvalidRequestError(
                f"the request holds {len(sources)} images, over the limit of {limit}"
            )
        threshold = (
            self.settings.default_threshold if options.threshold is None else options.threshold
        )
        max_det = options.max_detections or self.settings.default_max_detections
        class_ids = self.resolve_classes(options.classes)
        prepared = await self._prepare_all(sources)
        tasks = [p.task(threshold, max_det, class_ids) for p in prepared]
        queued = time.monotonic()
        outputs = await self._submit(tasks, deadline)
        return self._response(prepared, outputs, queued)

    async def _prepare_all(self, sources: Sequence[ImageSource]) -> list[_Prepared]:
        """Fetch and decode every image concurrently; the first bad image cancels the rest
        (no download goes on for a request that is already answered 4xx)."""
        jobs: list[asyncio.Task[_Prepared]] = []
        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(self._prepare(i, s)) for i, s in enumerate(sources)]
        except ExceptionGroup as failed:
            errors = [e for e in failed.exceptions if isinstance(e, ApiError)]
            if len(errors) != len(failed.exceptions):
                raise
            first = min(errors, key=lambda e: -1 if e.image_index is None else e.image_index)
            self.metrics.image_errors.labels(first.error_type).inc()
            # Each error's traceback holds its image's frame and bytes (a downloaded body keeps
            # its share of the download buffer while alive), in a cycle through this frame and
            # the tasks: freed only by a full collection otherwise. The answer needs neither.
            for error in errors:
                error.__traceback__ = None
            jobs.clear()
            raise first from None
        return [job.result() for job in jobs]

    def resolve_classes(self, classes: list[str | int] | None) -> frozenset[int] | None:
        if classes is None:
            return None
        ids = set()
        for cls in classes:
            if isinstance(cls, int) or (isinstance(cls, str) and cls.strip().isdigit()):
                cid = int(cls)
                if cid not in self.info.labels:
                    raise InvalidRequestError(
                        f"unknown class id {cid}; the model's ids are "
                        f"0..{len(self.info.labels) - 1}"
                    )
            else:
                found = self._ids_by_name.get(cls.strip().lower())
                if found is None:
                    known = ", ".join(sorted(self.info.labels.values()))
                    raise InvalidRequestError(f"unknown class {cls!r}; the model knows: {known}")
                cid = found
            ids.add(cid)
        return frozenset(ids)

    async def _prepare(self, index: int, source: ImageSource) -> _Prepared:
        started = time.perf_counter()
        if source.url is not None:
            data = await self.fetcher.fetch(source.url, index=index)
        elif source.base64 is not None:
            text = source.base64
            if len(text) <= _INLINE_BASE64_CHARS:
                data = _b64decode(text, index)
            else:
                data = await to_thread.run_sync(lambda: _b64decode(text, index))
        else:
            data = source.raw or b""
        if len(data) > self.settings.max_upload_bytes:
            raise InvalidImageError(
                f"the image is {len(data)} bytes, over the limit of "
                f"{self.settings.max_upload_bytes}",
                image_index=index,
            )
        fetched = time.perf_counter()
        max_pixels = self.settings.max_image_pixels
        jpeg = None
        if self.jpeg_on_device:
            if len(data) <= _INLINE_PROBE_BYTES:
                jpeg = probe_plain_jpeg(data, max_pixels=max_pixels, index=index)
            else:
                jpeg = await to_thread.run_sync(
                    lambda: probe_plain_jpeg(data, max_pixels=max_pixels, index=index)
                )
        prepared: _Prepared
        if jpeg is not None:
            prepared = _Prepared(jpeg, jpeg.height, jpeg.width, 0.0, 0.0)
        else:
            image = await to_thread.run_sync(
                lambda: decode_image(data, max_pixels=max_pixels, index=index),
                limiter=self._decode_slots,
            )
            prepared = _Prepared(image.pixels, image.height, image.width, 0.0, 0.0)
        decoded = time.perf_counter()
        prepared.fetch_s, prepared.decode_s = fetched - started, decoded - fetched
        self.metrics.stage_latency.labels("decode").observe(decoded - fetched)
        if source.url is not None:
            self.metrics.stage_latency.labels("fetch").observe(fetched - started)
        return prepared

    async def _submit(self, tasks: list[DetectionTask], deadline: float) -> list[ImageDetections]:
        try:
            return await self.engine.submit(tasks, deadline)
        except QueueFullError as exc:
            raise QueueFullApiError(
                str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from None
        except (ShuttingDownError, EngineUnavailableError) as exc:
            raise UnavailableError(str(exc), headers={"Retry-After": "1"}) from None
        except DeadlineExceededError as exc:
            raise DeadlineError(str(exc)) from None
        except (BatchFailedError, DeviceOutOfMemoryError) as exc:
            raise InferenceError(str(exc)) from None
        except ApiError as exc:  # an image the device decoder and Pillow both refused
            self.metrics.image_errors.labels(exc.error_type).inc()
            raise

    def _response(
        self, prepared: list[_Prepared], outputs: list[ImageDetections], queued: float
    ) -> DetectResult:
        images = []
        answered = time.monotonic()
        stages = self.metrics.stage_latency
        detections = 0
        for p, out in zip(prepared, outputs, strict=True):
            queue_s = max(0.0, answered - queued - out.inference_s - out.postprocess_s)
            stages.labels("queue").observe(queue_s)
            stages.labels("inference").observe(out.inference_s)
            stages.labels("postprocess").observe(out.postprocess_s)
            detections += len(out.scores)
            timings = {
                "fetch_ms": round(p.fetch_s * 1e3, 3),
                "decode_ms": round(p.decode_s * 1e3, 3),
                "queue_ms": round(queue_s * 1e3, 3),
                "inference_ms": round(out.inference_s * 1e3, 3),
                "postprocess_ms": round(out.postprocess_s * 1e3, 3),
                "batch_size": out.batch_size,
            }
            images.append(AnsweredImage(p.width, p.height, out, timings))
        self.metrics.detections.inc(detections)
        self.metrics.images.inc(len(images))
        return DetectResult(self.info.name, images)


def _b64decode(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return _b64decode_slices(text)
    except (binascii.Error, ValueError):
        pass
    try:  # whitespace (line breaks every 76 characters, as MIME writes it) is allowed
        return _b64decode_slices("".join(text.split()))
    except (binascii.Error, ValueError):
        raise InvalidImageError("'data' is not valid base64", image_index=index) from None


def _b64decode_slices(text: str) -> bytes:
    """base64.b64decode(text, validate=True) one slice at a time: binascii holds the GIL, and
    between slices a worker thread lets the event loop in (a 32 MB text is ~70 ms in one call).
    Padding may only end the text, as with the whole-text call."""
    if len(text) <= _BASE64_SLICE:
        return base64.b64decode(text, validate=True)
    if len(text) % 4 or "=" in text[: len(text) - 2]:
        raise binascii.Error("misplaced padding or incomplete quantum")
    return b"".join(
        base64.b64decode(text[i : i + _BASE64_SLICE], validate=True)
        for i in range(0, len(text), _BASE64_SLICE)
    )
