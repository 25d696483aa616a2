"""The one place jobs run: claim a queued job, read its image region by region, send its tiles
to the engine at low priority, merge their boxes, write the result.

Tiles are SAHI's geometry (app/tile_geometry.py TileSpec.tiles), as for `"tiling"` on
/v1/detect; the merge is the engine's (app/engine/tile_tasks.py merge_detections). A row of tiles
is read in chunks of up to one batch of tiles (one region read: the TIFF tiles under them decode
once), with two chunks in flight: while the engine runs one, the next is read. Memory held: two
chunks' regions (a region is tile_size high and chunk * step wide) plus the boxes found.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.batching import BatcherError, Priority, ShuttingDownError
from app.config import Settings
from app.engine.tasks import DetectionTask, ImageDetections, ModelInfo
from app.jobs.reader import ImageSource, UnreadableImageError, open_image
from app.jobs.store import Job, JobStore
from app.tile_geometry import TileSpec

logger = logging.getLogger(__name__)

_POLL_S = 0.5
_PRUNE_EVERY_S = 60.0
_CHUNK_DEADLINE_S = 600.0  # a chunk of job tiles waits behind online work at most this long
_ENGINE_RETRIES = 5  # an engine restart mid-job: the chunk is sent again after it is back
_CHUNKS_IN_FLIGHT = 2


class EngineClient(Protocol):
    async def submit(
        self, tasks: list[DetectionTask], deadline: float, priority: Priority = "online"
    ) -> list[ImageDetections]: ...


class JobFailedError(Exception):
    """A job that cannot finish; the message is its reason."""


@dataclass
class _Boxes:
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def add(self, det: ImageDetections, x: int, y: int) -> None:
        if det.scores.size:
            self.boxes.append(det.boxes + np.array([x, y, x, y], dtype=np.float32))
            self.scores.append(det.scores.astype(np.float32, copy=False))
            self.labels.append(det.labels.astype(np.int64, copy=False))


def chunks(spec: TileSpec, height: int, width: int, size: int) -> list[list[tuple[int, ...]]]:
    """The tiles, row by row, in runs of at most `size` neighbours of one row."""
    out: list[list[tuple[int, ...]]] = []
    row: list[tuple[int, ...]] = []
    for tile in spec.tiles(height, width):
        if row and (tile[1] != row[0][1] or len(row) == size):
            out.append(row)
            row = []
        row.append(tile)
    if row:
        out.append(row)
    return out


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        client: EngineClient,
        info: Callable[[], ModelInfo | None],
        fetch: Callable[[str, Path], Any] | None = None,
    ) -> None:
        """`info`: the model's description once the engine is connected; `fetch(url, path)`:
        an awaitable download of a URL job's image to `path` (SSRF rules, size cap)."""
        self.settings = settings
        self.store = store
        self.client = client
        self._info = info
        self._fetch = fetch
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._wake = asyncio.Event()

    def _forget(self, job_id: str, _: object) -> None:
        self._running.pop(job_id, None)

    def stop_taking(self) -> None:
        """The server is draining: no new job starts, no new chunk is sent."""
        self._stopping = True
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        last_prune = 0.0
        try:
            while not self._stopping:
                if time.monotonic() - last_prune > _PRUNE_EVERY_S:
                    last_prune = time.monotonic()
                    await self._prune()
                if self._info() is not None:
                    while len(self._running) < self.settings.max_concurrent_jobs:
                        job = await asyncio.to_thread(self.store.claim)
                        if job is None:
                            break
                        task = asyncio.get_running_loop().create_task(self._run_job(job))
                        self._running[job.id] = task
                        task.add_done_callback(functools.partial(self._forget, job.id))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _POLL_S)
        finally:
            for task in list(self._running.values()):
                task.cancel()
            for task in list(self._running.values()):
                with contextlib.suppress(BaseException):
                    await task

    async def _prune(self) -> None:
        s = self.settings
        try:
            gone = await asyncio.to_thread(
                self.store.prune, s.job_retention_s, s.job_store_max_bytes
            )
        except Exception:
            logger.exception("pruning the job store failed")
            return
        if gone:
            logger.info("job store: %d finished job(s) deleted (retention, size limit)", gone)

    async def _run_job(self, job: Job) -> None:
        started = time.monotonic()
        logger.info("job %s: started", job.id)
        try:
            result = await self._process(job)
        except asyncio.CancelledError:
            raise
        except ShuttingDownError:
            logger.info("job %s: stopped by the shut-down (failed at the next start)", job.id)
            return
        except (JobFailedError, UnreadableImageError) as exc:
            logger.info("job %s: failed: %s", job.id, exc)
            await asyncio.to_thread(self.store.fail, job.id, str(exc))
            return
        except Exception as exc:
            logger.exception("job %s: failed", job.id)
            await asyncio.to_thread(
                self.store.fail, job.id, f"internal error: {type(exc).__name__}: {exc}"
            )
            return
        if result is None:
            logger.info("job %s: cancelled", job.id)
            return
        await asyncio.to_thread(self.store.succeed, job.id, result)
        logger.info(
            "job %s: succeeded, %d detections in %.1f s",
            job.id,
            len(result["detections"]),
            time.monotonic() - started,
        )

    async def _process(self, job: Job) -> dict[str, Any] | None:
        """The job's result, or None when it was cancelled meanwhile."""
        s = self.settings
        request = job.request
        path = self.store.upload_path(job.id)
        if job.source != "upload":
            if self._fetch is None:
                raise JobFailedError("URL jobs are not available here")
            await self._fetch(job.source, path)
        source = await asyncio.to_thread(
            open_image,
            path,
            level=int(request.get("level", 0)),
            max_whole_pixels=s.max_job_image_pixels,
        )
        try:
            return await self._tiles(job, source)
        finally:
            source.close()

    async def _tiles(self, job: Job, source: ImageSource) -> dict[str, Any] | None:
        request = job.request
        spec = TileSpec(**request["tiling"])
        height, width = source.height, source.width
        runs = chunks(spec, height, width, self.settings.max_batch_size)
        total = sum(len(r) for r in runs)
        await asyncio.to_thread(self.store.set_geometry, job.id, width, height, total)
        threshold = float(request["threshold"])
        class_ids = request.get("class_ids")
        classes = frozenset(class_ids) if class_ids is not None else None
        per_tile = int(request["tile_max_detections"])
        found = _Boxes()
        done = 0

        async def send(run: list[tuple[int, ...]]) -> asyncio.Task[list[ImageDetections]]:
            x0, y0, x_end, y_end = run[0][0], run[0][1], run[-1][2], run[-1][3]
            region = await asyncio.to_thread(source.read, x0, y0, x_end, y_end)
            tasks = [
                DetectionTask(region[:, x1 - x0 : x2 - x0], threshold, per_tile, classes)
                for x1, _, x2, _ in run
            ]
            return asyncio.get_running_loop().create_task(self._submit(tasks))

        pending: deque[tuple[asyncio.Task[list[ImageDetections]], list[tuple[int, ...]]]]
        pending = deque()
        try:
            for index, run in enumerate(runs):
                if self._stopping:
                    raise ShuttingDownError()
                pending.append((await send(run), run))
                if len(pending) < _CHUNKS_IN_FLIGHT and index + 1 < len(runs):
                    continue
                while len(pending) >= (_CHUNKS_IN_FLIGHT if index + 1 < len(runs) else 1):
                    task, done_run = pending.popleft()
                    for (x1, y1, _, _), det in zip(done_run, await task, strict=True):
                        found.add(det, x1, y1)
                    done += len(done_run)
                    status = await asyncio.to_thread(self.store.progress, job.id, done)
                    if status != "running":  # cancelled (DELETE) meanwhile
                        return None
        finally:
            for task, _ in pending:
                task.cancel()
        detections = await asyncio.to_thread(
            _merged, found, spec, int(request["max_detections"]), self._labels()
        )
        return {"width": width, "height": height, "detections": detections}

    def _labels(self) -> dict[int, str]:
        info = self._info()
        return info.labels if info is not None else {}

    async def _submit(self, tasks: list[DetectionTask]) -> list[ImageDetections]:
        from app.batching import BatchFailedError, DeadlineExceededError
        from app.ipc.client import EngineUnavailableError

        for attempt in range(_ENGINE_RETRIES + 1):
            try:
                return await self.client.submit(tasks, time.monotonic() + _CHUNK_DEADLINE_S, "low")
            except EngineUnavailableError:
                if attempt == _ENGINE_RETRIES:
                    raise JobFailedError(
                        "the engine process was unavailable for too long (it restarted "
                        f"{_ENGINE_RETRIES} times during this job)"
                    ) from None
                await asyncio.sleep(min(2.0**attempt, 10.0))
            except DeadlineExceededError:
                raise JobFailedError(
                    f"tiles waited over {_CHUNK_DEADLINE_S:.0f} s behind online requests"
                ) from None
            except BatchFailedError as exc:
                raise JobFailedError(str(exc)) from None
            except BatcherError as exc:
                if isinstance(exc, ShuttingDownError):
                    raise
                raise JobFailedError(str(exc)) from None
        raise AssertionError("unreachable")


def _merged(
    found: _Boxes, spec: TileSpec, max_detections: int, labels: dict[int, str]
) -> list[dict[str, Any]]:
    """The tiles' boxes merged as a tiled /v1/detect image's are, best first, in /v1's shape."""
    if not found.scores:
        return []
    import torch

    from app.engine.tile_tasks import merge_detections

    boxes, scores, classes = merge_detections(
        torch.from_numpy(np.concatenate(found.boxes)),
        torch.from_numpy(np.concatenate(found.scores)),
        torch.from_numpy(np.concatenate(found.labels)),
        method=spec.merge,
        metric=spec.match_metric,
        threshold=spec.match_threshold,
        class_agnostic=spec.class_agnostic,
    )
    class_ids = classes[:max_detections].tolist()
    rounded_scores = np.round(scores[:max_detections].double().numpy(), 5).tolist()
    rounded_boxes = np.round(boxes[:max_detections].double().numpy(), 2).tolist()
    return [
        {"label": labels.get(c, str(c)), "class_id": c, "score": sc, "box": b}
        for c, sc, b in zip(class_ids, rounded_scores, rounded_boxes, strict=True)
    ]
