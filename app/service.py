"""One detection request's path: bytes (upload, base64, URL) -> decode -> engine -> results.

Everything a client could get wrong is checked here, before any image reaches the model. Work is
admitted by pixels: every image's header is read first, the request's decoded pixels are checked
against a per-request limit (413) and reserved from the server-wide budget (429 when there is no
room), and only then is anything decoded. Where the engines decode JPEGs on the GPU, a plain JPEG
only has its header checked here and travels on encoded; everything else is decoded with Pillow
in a worker process (app/images/pool.py), large images straight to the model's input size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import pybase64
from anyio import CapacityLimiter, to_thread

from app.admission import BudgetExhaustedError, Lease, PixelBudget
from app.batching import (
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from app.config import Settings
from app.engine.preprocess_spec import PreprocessSpec
from app.engine.tasks import DetectionTask, DeviceOutOfMemoryError, ImageDetections, ModelInfo
from app.errors import (
    ApiError,
    DeadlineError,
    ImageTooLargeError,
    InferenceError,
    InvalidImageError,
    InvalidRequestError,
    PayloadTooLargeError,
    QueueFullApiError,
    UnavailableError,
)
from app.fetch import Fetcher
from app.images.decode import (
    DECODE_WEIGHT,
    REDUCE_ABOVE_PIXELS,
    EncodedJpeg,
    Fit,
    ImageInfo,
    probe_image,
)
from app.images.pool import QUARANTINE_S, DecodePool, Into
from app.images.render import Boxes
from app.ipc.client import EngineUnavailableError, Reservation
from app.metrics import Metrics
from app.options import DetectOptions
from app.tile_geometry import MAX_TILE_SIZE, MIN_TILE_SIZE, TileSpec, wants_tiles

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
    """One image's answer, as arrays: encoded to v1 JSON or v2 tensors by app/api/v1/encode.py."""

    width: int
    height: int
    detections: ImageDetections
    timings: dict[str, float]
    rendered: bytes | None = None  # the image with its boxes drawn, when asked for


@dataclass(frozen=True)
class RenderSpec:
    """How to draw the detections on each image (app/images/render.py)."""

    fmt: str = "jpeg"  # or "png"
    labels: bool = True


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
    tiling: TileSpec | None = None  # runs as tiles: decoded at full size

    @property
    def pixels(self) -> int:
        """Pixels the image holds at its largest (while decoding, or on the device)."""
        return self.info.height * self.info.width if self.jpeg else self.info.decode_pixels

    @property
    def render_pixels(self) -> int:
        """Pixels a render holds: the whole image, decoded at full size."""
        return self.info.height * self.info.width * DECODE_WEIGHT.get(self.info.format, 1)


@dataclass
class _Prepared:
    image: np.ndarray | EncodedJpeg  # uint8 [H, W, 3] pixels, or a JPEG for the device
    height: int
    width: int
    fetch_s: float
    decode_s: float
    tiling: TileSpec | None = None
    block: Reservation | None = None  # `image` is this arena block (decoded into it)

    def task(
        self, threshold: float, max_det: int, class_ids: frozenset[int] | None
    ) -> DetectionTask:
        if isinstance(self.image, EncodedJpeg):
            return DetectionTask(None, threshold, max_det, class_ids, jpeg=self.image)
        if self.tiling is not None:  # full-size pixels, cut into tiles by the engine
            return DetectionTask(
                self.image,
                threshold,
                max_det,
                class_ids,
                tiling=self.tiling,
                arena_block=self.block,
            )
        # The pixels may be reduced to the model's input: boxes come back in the original's.
        return DetectionTask(
            self.image,
            threshold,
            max_det,
            class_ids,
            source_size=(self.height, self.width),
            arena_block=self.block,
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
        self.fetcher = fetcher
        self.metrics = metrics
        # Observed for every image: the labelled children kept (labels() locks and looks up).
        self._answer_stages = tuple(
            metrics.stage_latency.labels(s) for s in ("queue", "inference", "postprocess")
        )
        # Decoding competes with the model for the same cores: more decode workers than cores
        # only adds switching (and stalls torch's parallel regions).
        workers = settings.decode_threads or os.cpu_count() or 1
        self._decode_slots = CapacityLimiter(workers)
        self._decode_pool = DecodePool(workers)
        self._pixels = PixelBudget(settings.max_inflight_pixels)
        # Pixels being decoded at once, whatever the cores: two of the largest images. Decoding
        # needs up to ~8 bytes a pixel (the file's own mode, then 8-bit RGB or grey).
        self._decoding = PixelBudget(2 * settings.max_image_pixels)
        # Renders decode whole images, draw and encode them: at most all but one decode worker
        # at once, so that detection requests always find one.
        self._render_slots = CapacityLimiter(max(1, workers - 1))
        self._bind(settings, info, engine, jpeg_on_device)

    def for_model(
        self,
        settings: Settings,
        info: ModelInfo,
        engine: EngineClient,
        *,
        jpeg_on_device: bool = False,
    ) -> DetectionService:
        """The service of another model (several models served at once): its own settings,
        labels, input size and engine; this one's decode workers, pixel budgets and fetcher
        (the server's, whichever model a request names)."""
        other = copy.copy(self)
        other._bind(settings, info, engine, jpeg_on_device)
        return other

    def _bind(
        self, settings: Settings, info: ModelInfo, engine: EngineClient, jpeg_on_device: bool
    ) -> None:
        """What belongs to the model: settings (serve.json applied), labels, engine, input."""
        self.settings = settings
        self.jpeg_on_device = jpeg_on_device
        self.info = info
        self.engine = engine
        self._ids_by_name = {name.lower(): cid for cid, name in info.labels.items()}
        spec = PreprocessSpec.for_model(settings.model)
        # A model on the CPU shares its cores with decoding: every image is resized to its input
        # in the decode worker (Pillow, as the model's own processor does), not in the engine's
        # float pre-processing. A GPU resizes a batch faster than Pillow: small images go whole.
        # An Ultralytics model resizes with OpenCV in the engine (spec.resize_with): its images
        # go whole up to REDUCE_ABOVE_PIXELS, so that they get exactly Ultralytics' pixels.
        on_cpu = info.device.startswith("cpu") and spec.resize_with == "pillow"
        self._fit = Fit(spec.output_size, spec.resample, 0 if on_cpu else REDUCE_ABOVE_PIXELS)
        # The model's input side: the default tile size, and what "auto" compares images with.
        self._model_side = max(spec.output_size(1024, 1024))
        self._auto_factor = settings.tiling_auto_factor

    async def detect(
        self,
        sources: Sequence[ImageSource],
        options: DetectOptions,
        render: RenderSpec | None = None,
        *,
        timeout_s: float | None = None,
    ) -> DetectResult:
        """Detections for each image; with `render`, also each image with its boxes drawn.
        `timeout_s` (a client's own deadline, e.g. gRPC's) may only shorten the server's."""
        arrived = time.monotonic()
        limit_s = self.settings.request_timeout_s
        deadline = arrived + (limit_s if timeout_s is None else min(limit_s, timeout_s))
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
        # The deadline covers the request's whole life: waiting for a download slot,
        # downloading, waiting for room to decode, decoding, queueing, running and drawing.
        # Past it the answer is 504 at once and the work still going on for it is cancelled
        # (downloads, decode workers, the images queued in the engine).
        stage = "reading its images"
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                tiling, auto = self.tile_spec(options)
                loaded = await self._gather(
                    [self._load(i, s, tiling, auto) for i, s in enumerate(sources)]
                )
                self._check_tiles(loaded)
                if render is not None:
                    full_size = sum(x.render_pixels for x in loaded)
                    self._check_request_pixels(loaded, full_size, "drawn at full size take")
                stage = "waiting for room to decode its images"
                # Arena blocks the request's images are decoded into: a submission takes
                # them (freed with the engine's answer); the others are given back here.
                blocks: list[Reservation] = []
                async with self._admit(loaded, deadline) as lease:
                    try:
                        stage = "decoding its images"
                        prepared = await self._gather(
                            [self._decode(x, lease, deadline, blocks) for x in loaded]
                        )
                        tasks = [p.task(threshold, max_det, class_ids) for p in prepared]
                        stage = "waiting for the model"
                        queued = time.monotonic()
                        outputs = await self._submit(tasks, deadline)
                    finally:
                        for block in blocks:
                            block.release()
                result = self._response(prepared, outputs, queued)
                if render is None:
                    return result
                # After the detection's pixels are given back: a render admits its own.
                stage = "drawing its images"
                drawn = await self._gather(
                    [
                        self._render(x, out, render, deadline)
                        for x, out in zip(loaded, outputs, strict=True)
                    ]
                )
        except TimeoutError:
            raise DeadlineError(
                f"the request passed its deadline of {deadline - arrived:g} s "
                f"(request_timeout_s, or the client's own if shorter) while {stage}"
            ) from None
        images = []
        for image, (data, render_s) in zip(result.images, drawn, strict=True):
            timings = {**image.timings, "render_ms": round(render_s * 1e3, 3)}
            images.append(dataclasses.replace(image, rendered=data, timings=timings))
        return DetectResult(result.model, images)

    def _check_request_pixels(self, loaded: list[_Loaded], wanted: int, doing: str) -> None:
        """413 when the request's images take more than max_request_pixels `doing` so."""
        limit = self.settings.max_request_pixels
        if wanted > limit:
            raise PayloadTooLargeError(
                f"the request's {len(loaded)} images {doing} {wanted} pixels, over the limit "
                f"of {limit} pixels per request"
            )

    async def _render(
        self, loaded: _Loaded, found: ImageDetections, spec: RenderSpec, deadline: float
    ) -> tuple[bytes, float]:
        """The image at its own resolution with its boxes drawn, in a decode worker process:
        admitted by pixels like a decode (429 when the server has no room), at most
        `_render_slots` at once, stopped at the request's deadline."""
        index = loaded.index
        late = DeadlineError(
            f"the request passed its deadline of {self.settings.request_timeout_s} s before "
            "this image could be drawn",
            image_index=index,
        )
        boxes = Boxes(found.boxes, found.labels, found.scores, self.info.labels)
        started = time.perf_counter()
        async with (
            self._admit_pixels(loaded.render_pixels, deadline),
            self._in_worker(loaded.render_pixels, deadline, late, self._render_slots) as left_s,
        ):
            data = await self._decode_pool.render(
                loaded.data,
                boxes,
                max_pixels=self.settings.max_image_pixels,
                index=index,
                fmt=spec.fmt,
                labels=spec.labels,
                timeout_s=left_s,
            )
        render_s = time.perf_counter() - started
        self.metrics.stage_latency.labels("render").observe(render_s)
        return data, render_s

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
        self._check_request_pixels(loaded, wanted, "decode to")
        async with self._admit_pixels(wanted, deadline) as lease:
            yield lease

    @contextlib.asynccontextmanager
    async def _admit_pixels(self, wanted: int, deadline: float) -> AsyncIterator[Lease]:
        """`wanted` pixels of the server-wide budget for the block; 429 when no room comes."""
        wait_s = min(_ADMISSION_WAIT_S, deadline - time.monotonic())
        try:
            async with self._pixels.hold(wanted, wait_s) as lease:
                yield lease
        except BudgetExhaustedError as exc:
            raise QueueFullApiError(
                str(exc), headers={"Retry-After": str(exc.retry_after_s)}
            ) from None

    def tile_spec(self, options: DetectOptions) -> tuple[TileSpec | None, bool]:
        """The request's tiling (its options over the server's defaults), and whether it is
        "auto" (only images large enough run tiled)."""
        given = options.tiling_options
        if given is None:
            return None, False
        s = self.settings

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        size = given.tile_size or s.tiling_tile_size or self._model_side
        spec = TileSpec(
            tile_size=min(max(size, MIN_TILE_SIZE), MAX_TILE_SIZE),
            overlap=pick(given.overlap, s.tiling_overlap),
            full_image=pick(given.full_image, s.tiling_full_image),
            merge=pick(given.merge, s.tiling_merge),
            match_metric=pick(given.match_metric, s.tiling_match_metric),
            match_threshold=pick(given.match_threshold, s.tiling_match_threshold),
            class_agnostic=pick(given.class_agnostic, s.tiling_class_agnostic),
        )
        return spec, bool(given.auto)

    def _check_tiles(self, loaded: list[_Loaded]) -> None:
        tiles = sum(x.tiling.count(x.info.height, x.info.width) for x in loaded if x.tiling)
        limit = self.settings.max_tiles
        if tiles > limit:
            spec = next(x.tiling for x in loaded if x.tiling)
            raise PayloadTooLargeError(
                f"tiling.tile_size {spec.tile_size} with overlap {spec.overlap} cuts the "
                f"request's images into {tiles} tiles, over the limit of {limit} per request: "
                "send a larger tile_size, a smaller overlap, or fewer images"
            )

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

    async def _load(
        self, index: int, source: ImageSource, tiling: TileSpec | None = None, auto: bool = False
    ) -> _Loaded:
        """The image's bytes and what its header says; nothing decoded yet. With tiling, the
        image may be up to the tiled pixel limit and is held at full size."""
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
        plain_limit = self.settings.max_image_pixels
        max_pixels, fit = plain_limit, self._fit
        if tiling is not None:
            max_pixels = self.settings.tiled_image_pixels

        def probe() -> ImageInfo:
            return probe_image(data, max_pixels=max_pixels, index=index, fit=fit)

        info = probe() if len(data) <= _INLINE_PROBE_BYTES else await to_thread.run_sync(probe)
        if tiling is not None and (
            not auto or wants_tiles(info.height, info.width, self._model_side, self._auto_factor)
        ):
            # Decoded whole (the tiles are cut from it): held at full size until answered.
            full = info.height * info.width
            info = replace(
                info, decode_pixels=full * DECODE_WEIGHT.get(info.format, 1), held_pixels=full
            )
            return _Loaded(index, data, info, None, fetched - started, tiling)
        if info.height * info.width > plain_limit:
            raise ImageTooLargeError(
                f"the image has {info.width}x{info.height} = {info.height * info.width} pixels, "
                f"over the limit of {plain_limit} (images that run tiled may have up to "
                f"{self.settings.tiled_image_pixels})",
                image_index=index,
            )
        jpeg = None
        loaded_pixels = info.height * info.width
        # Larger JPEGs are decoded by Pillow at a reduced scale rather than in full on the device.
        if self.jpeg_on_device and info.plain_jpeg and loaded_pixels <= REDUCE_ABOVE_PIXELS:
            jpeg = EncodedJpeg(data, info.height, info.width, index)
        return _Loaded(index, data, info, jpeg, fetched - started)

    async def _decode(
        self,
        loaded: _Loaded,
        lease: Lease,
        deadline: float,
        blocks: list[Reservation] | None = None,
    ) -> _Prepared:
        """The image decoded in a worker process, which writes the pixels straight into a
        block of the engine's shared-memory arena when the engine client offers one (`blocks`
        receives it): no copy back through the worker's pipe, none into the arena after."""
        info, index = loaded.info, loaded.index
        if loaded.jpeg is not None:
            return _Prepared(loaded.jpeg, info.height, info.width, loaded.fetch_s, 0.0)
        late = DeadlineError(
            f"the request passed its deadline of {self.settings.request_timeout_s} s before "
            "this image could be decoded",
            image_index=index,
        )
        started = time.perf_counter()
        tiled = loaded.tiling is not None
        target = None if tiled else self._fit.target(info.height, info.width)
        block = into = None
        reserve = getattr(self.engine, "reserve", None)
        try:
            async with self._in_worker(loaded.pixels, deadline, late) as left_s:
                # Reserved once a worker is free: blocks are not held by queued images. A
                # worker whose pixels come out another shape sends them back instead.
                if reserve is not None and blocks is not None:
                    height, width = target or (info.height, info.width)
                    block = reserve(height, width)
                    if block is not None:
                        blocks.append(block)
                        into = Into(block.arena, block.offset, height, width)
                pixels = await self._decode_pool.decode(
                    loaded.data,
                    max_pixels=self.settings.tiled_image_pixels
                    if tiled
                    else self.settings.max_image_pixels,
                    index=index,
                    target=target,
                    resample=self._fit.resample,
                    timeout_s=min(self.settings.decode_timeout_s, left_s),
                    into=into,
                )
        except BaseException:
            if block is not None:  # its worker may still write it until stopped
                block.release(QUARANTINE_S)
            raise
        decode_s = time.perf_counter() - started
        self.metrics.stage_latency.labels("decode").observe(decode_s)
        lease.release(loaded.pixels - info.held_pixels)
        if pixels is None:
            assert block is not None
            return _Prepared(
                block.pixels,
                info.height,
                info.width,
                loaded.fetch_s,
                decode_s,
                loaded.tiling,
                block,
            )
        if block is not None:  # the worker could not reach the arena: copied at submission
            block.release()
        return _Prepared(pixels, info.height, info.width, loaded.fetch_s, decode_s, loaded.tiling)

    @contextlib.asynccontextmanager
    async def _in_worker(
        self, pixels: int, deadline: float, late: DeadlineError, *limiters: CapacityLimiter
    ) -> AsyncIterator[float]:
        """Room for `pixels` in the decoding budget, then `limiters` and a decode worker, held
        for the block; yields the seconds left. `late` when the deadline passes first."""
        async with contextlib.AsyncExitStack() as stack:
            # An image weighing more than the whole decoding budget decodes alone.
            weight = min(pixels, self._decoding.capacity)
            try:
                await stack.enter_async_context(
                    self._decoding.hold(weight, deadline - time.monotonic())
                )
            except BudgetExhaustedError:
                raise late from None
            for limiter in (*limiters, self._decode_slots):
                await stack.enter_async_context(limiter)
            # Checked once a worker is free: a request whose deadline passed while it waited
            # starts no work.
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise late
            yield left_s

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
        queue, inference, postprocess = self._answer_stages
        per_model = self.metrics.model_inference.labels(self.info.name)
        detections = 0
        for p, out in zip(prepared, outputs, strict=True):
            queue_s = max(0.0, answered - queued - out.inference_s - out.postprocess_s)
            queue.observe(queue_s)
            inference.observe(out.inference_s)
            per_model.observe(out.inference_s)
            postprocess.observe(out.postprocess_s)
            detections += len(out.scores)
            timings = {
                "fetch_ms": round(p.fetch_s * 1e3, 3),
                "decode_ms": round(p.decode_s * 1e3, 3),
                "queue_ms": round(queue_s * 1e3, 3),
                "inference_ms": round(out.inference_s * 1e3, 3),
                "postprocess_ms": round(out.postprocess_s * 1e3, 3),
                "batch_size": out.batch_size,
            }
            if out.tiles:
                timings["tiles"] = out.tiles
            images.append(AnsweredImage(p.width, p.height, out, timings))
        self.metrics.detections.inc(detections)
        self.metrics.images.inc(len(images))
        self.metrics.model_detections.labels(self.info.name).inc(detections)
        self.metrics.model_images.labels(self.info.name).inc(len(images))
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
        return _b64decode_strict(text)
    if len(text) % 4 or "=" in text[: len(text) - 2]:
        raise binascii.Error("misplaced padding or incomplete quantum")
    return b"".join(
        _b64decode_strict(text[i : i + _BASE64_SLICE]) for i in range(0, len(text), _BASE64_SLICE)
    )


def _b64decode_strict(text: str) -> bytes:
    """base64.b64decode(text, validate=True), through pybase64 (SIMD: ~100x faster than
    binascii, whose 80 us for a 13 KB JPEG was the largest single cost of a JSON request). pybase64
    refuses some paddings binascii's strict mode accepts ('QUJD=' ...) and never accepts
    otherwise: on its refusal the standard library decides, so what is accepted is unchanged."""
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error too
        return base64.b64decode(text, validate=True)
