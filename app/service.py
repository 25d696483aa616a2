"""One detection request's path: bytes (upload, base64, URL) -> decode -> engine -> results.

Everything a client could get wrong is checked here, before any image reaches the model. Work is
admitted by pixels: every image's header is read first, the request's decoded pixels are checked
against a per-request limit (413) and reserved from the server-wide budget (429 when there is no
room), and only then is anything decoded. Where the engines decode JPEGs on the GPU, a plain JPEG
only has its header checked here and travels on encoded; everything else is decoded with Pillow
in a worker process (app/decode_pool.py), large images straight to the model's input size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from anyio import CapacityLimiter, to_thread

from app.admission import BudgetExhaustedError, Lease, PixelBudget
from app.batching import (
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from app.config import Settings
from app.decode_pool import DecodePool
from app.engine.preprocess_spec import PreprocessSpec
from app.engine.tasks import DetectionTask, DeviceOutOfMemoryError, ImageDetections, ModelInfo
from app.errors import (
    ApiError,
    DeadlineError,
    InferenceError,
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    QueueFullApiError,
    UnavailableError,
)
from app.fetch import Fetcher
from app.images import REDUCE_ABOVE_PIXELS, EncodedJpeg, Fit, ImageInfo, probe_image
from app.ipc.client import EngineUnavailableError
from app.metrics import Metrics
from app.schemas import DetectOptions

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


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


# Headers of larger files are read on a worker thread: the structure walk and Pillow's header
# parser pass over markers and chunks before the frame header.
_INLINE_PROBE_BYTES = 1 << 20
# Larger base64 texts are decoded on a worker thread, in slices (see _b64decode).
_INLINE_BASE64_CHARS = 1 << 20
_BASE64_SLICE = 1 << 20  # a multiple of 4
# How long a request may wait for room in the pixel budget before 429 (less near its deadline).
_ADMISSION_WAIT_S = 1.0


@dataclass
class _Loaded:
    """One image's bytes and header, read before admission."""

    index: int
    data: bytes
    info: ImageInfo
    jpeg: EncodedJpeg | None  # set when the JPEG goes to the device decoder
    fetch_s: float

    @property
    def pixels(self) -> int:
        """Pixels the image holds at its largest (while decoding, or on the device)."""
        return self.info.height * self.info.width if self.jpeg else self.info.decode_pixels


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
        # The pixels may be reduced to the model's input: boxes come back in the original's.
        return DetectionTask(
            self.image, threshold, max_det, class_ids, source_size=(self.height, self.width)
        )


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
        # Decoding competes with the model for the same cores: more decode workers than cores
        # only adds switching (and stalls torch's parallel regions).
        workers = settings.decode_threads or os.cpu_count() or 1
        self._decode_slots = CapacityLimiter(workers)
        self._decode_pool = DecodePool(workers)
        self._ids_by_name = {name.lower(): cid for cid, name in info.labels.items()}
        self._pixels = PixelBudget(settings.max_inflight_pixels)
        # Pixels being decoded at once, whatever the cores: two of the largest images. Decoding
        # needs up to ~8 bytes a pixel (the file's own mode, then 8-bit RGB or grey).
        self._decoding = PixelBudget(2 * settings.max_image_pixels)
        spec = PreprocessSpec.from_dir(settings.model)
        # A model on the CPU shares its cores with decoding: every image is resized to its input
        # in the decode worker (Pillow, as the model's own processor does), not in the engine's
        # float pre-processing. A GPU resizes a batch faster than Pillow: small images go whole.
        on_cpu = info.device.startswith("cpu")
        self._fit = Fit(spec.output_size, spec.resample, 0 if on_cpu else REDUCE_ABOVE_PIXELS)

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
        loaded = await self._gather([self._load(i, s) for i, s in enumerate(sources)])
        async with self._admit(loaded, deadline) as lease:
            prepared = await self._gather([self._decode(x, lease, deadline) for x in loaded])
            tasks = [p.task(threshold, max_det, class_ids) for p in prepared]
            queued = time.monotonic()
            outputs = await self._submit(tasks, deadline)
        return self._response(prepared, outputs, queued)

    async def _gather(self, jobs: list[Coroutine[Any, Any, _T]]) -> list[_T]:
        """Run one job per image concurrently; the first bad image cancels the rest (no download
        or decode goes on for a request that is already answered 4xx)."""
        if len(jobs) == 1:
            # Most requests hold one image: no task or task group to make for it.
            try:
                return [await jobs[0]]
            except ApiError as bad:
                self.metrics.image_errors.labels(bad.error_type).inc()
                bad.__traceback__ = None  # see below
                jobs.clear()
                raise bad from None
        tasks: list[asyncio.Task[_T]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(job) for job in jobs]
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
            tasks.clear()
            jobs.clear()
            raise first from None
        return [task.result() for task in tasks]

    @contextlib.asynccontextmanager
    async def _admit(self, loaded: list[_Loaded], deadline: float) -> AsyncIterator[Lease]:
        """Hold the request's pixels in the server-wide budget for the block: 413 beyond the
        per-request limit, 429 when no room comes within a second (or before the deadline)."""
        wanted = sum(x.pixels for x in loaded)
        limit = self.settings.max_request_pixels
        if wanted > limit:
            raise PayloadTooLargeError(
                f"the request's {len(loaded)} images decode to {wanted} pixels, over the limit "
                f"of {limit} pixels per request"
            )
        wait_s = min(_ADMISSION_WAIT_S, deadline - time.monotonic())
        try:
            async with self._pixels.hold(wanted, wait_s) as lease:
                yield lease
        except BudgetExhaustedError as exc:
            raise QueueFullApiError(
                str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from None

    def wait_started(self) -> None:
        """Block until the decode workers are up (blocking: call it from a thread)."""
        self._decode_pool.wait_started()

    def close(self) -> None:
        """Stop the decode workers."""
        self._decode_pool.close()

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

    async def _load(self, index: int, source: ImageSource) -> _Loaded:
        """The image's bytes and what its header says; nothing decoded yet."""
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
        if source.url is not None:
            self.metrics.stage_latency.labels("fetch").observe(fetched - started)
        max_pixels, fit = self.settings.max_image_pixels, self._fit

        def probe() -> ImageInfo:
            return probe_image(data, max_pixels=max_pixels, index=index, fit=fit)

        info = probe() if len(data) <= _INLINE_PROBE_BYTES else await to_thread.run_sync(probe)
        jpeg = None
        loaded_pixels = info.height * info.width
        # Larger JPEGs are decoded by Pillow at a reduced scale rather than in full on the device.
        if self.jpeg_on_device and info.plain_jpeg and loaded_pixels <= REDUCE_ABOVE_PIXELS:
            jpeg = EncodedJpeg(data, info.height, info.width, index)
        return _Loaded(index, data, info, jpeg, fetched - started)

    async def _decode(self, loaded: _Loaded, lease: Lease, deadline: float) -> _Prepared:
        info, index = loaded.info, loaded.index
        if loaded.jpeg is not None:
            return _Prepared(loaded.jpeg, info.height, info.width, loaded.fetch_s, 0.0)
        late = DeadlineError(
            f"the request passed its deadline of {self.settings.request_timeout_s} s before "
            "this image could be decoded",
            image_index=index,
        )
        started = time.perf_counter()
        try:
            # An image weighing more than the whole decoding budget decodes alone.
            weight = min(loaded.pixels, self._decoding.capacity)
            async with (
                self._decoding.hold(weight, deadline - time.monotonic()),
                self._decode_slots,
            ):
                # Checked once a worker is free: a request whose deadline passed while it
                # waited starts no decode.
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise late
                pixels = await self._decode_pool.decode(
                    loaded.data,
                    max_pixels=self.settings.max_image_pixels,
                    index=index,
                    target=self._fit.target(info.height, info.width),
                    resample=self._fit.resample,
                    timeout_s=min(self.settings.decode_timeout_s, left_s),
                )
        except BudgetExhaustedError:
            raise late from None
        decode_s = time.perf_counter() - started
        self.metrics.stage_latency.labels("decode").observe(decode_s)
        lease.release(loaded.pixels - info.held_pixels)
        return _Prepared(pixels, info.height, info.width, loaded.fetch_s, decode_s)

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
