"""RemoteEngine: a front-end worker's client of the engine process(es).

It offers what the in-process Batcher offers the service (`submit(tasks, deadline)`,
`max_batch_size`) and raises the same errors, so app/service.py does not know which one it
holds. Decoded pixels are copied once, into this worker's shared-memory arena; the engine reads
them there and answers with the detections. A block is freed when the engine answers for it
(never before: the engine may still be reading it), or when the engine is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from app.batching import (
    BatcherError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from app.engine.pipeline import DetectionTask, DeviceOutOfMemoryError, ImageDetections, ModelInfo
from app.errors import ApiError
from app.ipc.wire import ArenaAllocator, create_arena, read_message, write_message
from app.logging_setup import request_id_var

logger = logging.getLogger(__name__)

# Copies of larger images go to a worker thread so the event loop does not stall on them.
_INLINE_COPY_BYTES = 4 << 20
_RECONNECT_S = 0.05
# How long past its deadline a request waits for the engine's own 504 before giving up.
_DEADLINE_GRACE_S = 2.0


class EngineUnavailableError(BatcherError):
    """No engine process is connected, or the one holding the request died."""


@dataclass
class _Pending:
    future: asyncio.Future[list[ImageDetections]]
    blocks: list[tuple[int, int]]  # (offset, nbytes) in the arena
    images: int
    abandoned: bool = False  # the request gave up waiting; the answer only frees its blocks


@dataclass
class _Link:
    """The connection to one engine process."""

    path: str
    writer: asyncio.StreamWriter | None = None
    state: str = "loading"  # loading | ready | stuck | draining | restarting
    pending: dict[int, _Pending] = field(default_factory=dict)
    outstanding: int = 0  # images sent and not answered yet (for choosing an engine)


class RemoteEngine:
    def __init__(
        self,
        socket_paths: Sequence[str],
        arena_bytes: int,
        on_connect: Callable[[ModelInfo, int, bool], None] | None = None,
    ) -> None:
        self._links = [_Link(p) for p in socket_paths]
        self._arena_bytes = arena_bytes
        self._on_connect = on_connect
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._arena: shared_memory.SharedMemory | None = None
        self._allocator = ArenaAllocator(arena_bytes)
        self.info: ModelInfo | None = None
        self.max_batch_size = 1
        self.jpeg_on_device = False
        self._closing = False

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._arena = create_arena(self._arena_bytes)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_connected(link), name=f"engine-link-{i}")
            for i, link in enumerate(self._links)
        ]

    async def stop(self, timeout_s: float) -> None:
        """Wait (bounded) for answers still due, then disconnect and free the arena."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while any(link.pending for link in self._links) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._arena is not None:
            self._arena.close()
            self._arena.unlink()
            self._arena = None

    @property
    def state(self) -> str:
        """ready only when every engine is; else the first link's trouble."""
        states = [link.state for link in self._links]
        for bad in ("draining", "restarting", "stuck", "loading"):
            if bad in states:
                return bad
        return "ready"

    @property
    def queue_capacity_used(self) -> float:
        return self._allocator.used / self._allocator.size

    # -- the connection -----------------------------------------------------------------------
    async def _keep_connected(self, link: _Link) -> None:
        """Connect, read answers until the engine goes, fail what it held, reconnect (the
        supervisor restarts a dead engine at the same socket path)."""
        assert self._arena is not None
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(link.path)
            except OSError:
                await asyncio.sleep(_RECONNECT_S)
                continue
            try:
                write_message(writer, ("hello", self._arena.name))
                hello = await read_message(reader)
                _, info, max_batch_size, jpeg_on_device, state = hello
                self.info, self.max_batch_size, self.jpeg_on_device = (
                    info,
                    max_batch_size,
                    jpeg_on_device,
                )
                link.writer, link.state = writer, state
                logger.info("connected to the engine at %s (%s)", link.path, state)
                if self._on_connect is not None:
                    self._on_connect(info, max_batch_size, jpeg_on_device)
                while True:
                    self._dispatch(link, await read_message(reader))
            except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
                if link.state != "loading" and not self._closing:
                    logger.error("lost the engine at %s: %s", link.path, exc or type(exc).__name__)
            finally:
                link.writer = None
                if link.state != "loading":
                    link.state = "restarting"
                self._fail_all(link)
                writer.close()
            await asyncio.sleep(_RECONNECT_S)

    def _dispatch(self, link: _Link, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "state":
            link.state = message[1]
            return
        pending = link.pending.pop(message[1], None)
        if pending is None:
            return
        self._release(link, pending)
        if pending.abandoned or pending.future.done():
            return
        if kind == "ok":
            pending.future.set_result(
                [
                    ImageDetections(scores, labels, boxes, batch, inference_s, post_s)
                    for scores, labels, boxes, batch, inference_s, post_s in message[2]
                ]
            )
        else:
            pending.future.set_exception(_error(message[2], message[3]))

    def _release(self, link: _Link, pending: _Pending) -> None:
        for offset, nbytes in pending.blocks:
            self._allocator.release(offset, nbytes)
        pending.blocks = []
        link.outstanding -= pending.images

    def _fail_all(self, link: _Link) -> None:
        """The engine is gone: it reads no arena block any more; every request it held fails
        with 503 (the client may retry once /readyz says 200 again)."""
        for pending in link.pending.values():
            self._release(link, pending)
            if not pending.abandoned and not pending.future.done():
                pending.future.set_exception(
                    EngineUnavailableError("the engine process stopped while running this request")
                )
        link.pending.clear()
        link.outstanding = 0

    # -- intake -------------------------------------------------------------------------------
    def _pick(self) -> _Link:
        """The connected engine with the fewest images outstanding."""
        usable = [link for link in self._links if link.writer is not None]
        ready = [link for link in usable if link.state in ("ready", "stuck")]
        if not ready:
            if any(link.state == "draining" for link in usable):
                raise ShuttingDownError()
            raise EngineUnavailableError("no engine process is ready; retry shortly")
        return min(ready, key=lambda link: link.outstanding)

    async def submit(
        self, tasks: Sequence[DetectionTask], deadline: float
    ) -> list[ImageDetections]:
        """Same contract as Batcher.submit, plus EngineUnavailableError."""
        if self._closing:
            raise ShuttingDownError()
        self._pick()  # fail fast, before copying, when no engine is there
        items, blocks = await self._place(tasks)
        try:
            link = self._pick()  # again: the copy may have awaited a thread
        except BatcherError:
            for offset, nbytes in blocks:
                self._allocator.release(offset, nbytes)
            raise
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), blocks, len(tasks))
        link.pending[rid] = pending
        link.outstanding += len(tasks)
        writer = link.writer
        assert writer is not None
        write_message(writer, ("submit", rid, request_id_var.get(), deadline, items))
        try:
            await writer.drain()
            timeout = max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except TimeoutError:
            self._abandon(writer, rid, pending)
            raise DeadlineExceededError() from None
        except asyncio.CancelledError:  # the client went away
            self._abandon(writer, rid, pending)
            raise
        except ConnectionError:
            raise EngineUnavailableError("the engine process went away") from None

    def _abandon(self, writer: asyncio.StreamWriter, rid: int, pending: _Pending) -> None:
        pending.abandoned = True
        if not pending.future.done():
            pending.future.cancel()
        with contextlib.suppress(Exception):
            write_message(writer, ("cancel", rid))

    async def _place(
        self, tasks: Sequence[DetectionTask]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[int, int]]]:
        """Each task as a message item; pixels copied into the arena where they fit."""
        assert self._arena is not None
        buf = self._arena.buf
        items: list[tuple[Any, ...]] = []
        blocks: list[tuple[int, int]] = []
        for task in tasks:
            options = (task.threshold, task.max_detections, task.class_ids)
            if task.pixels is None:
                items.append(("jpeg", task.jpeg, *options))
                continue
            pixels = task.pixels
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            nbytes = height * width * 3
            offset = self._allocator.allocate(nbytes)
            if offset is None:
                # The arena is full (many large images at once): this one travels inline.
                items.append(("inline", np.ascontiguousarray(pixels), *options))
                continue
            blocks.append((offset, nbytes))
            view = np.ndarray((height, width, 3), dtype=np.uint8, buffer=buf, offset=offset)
            if nbytes > _INLINE_COPY_BYTES:
                await asyncio.to_thread(np.copyto, view, pixels)
            else:
                np.copyto(view, pixels)
            items.append(("shm", offset, height, width, *options))
        return items, blocks


def _error(kind: str, detail: Any) -> Exception:
    """The engine's error answer as the exception Batcher.submit would have raised."""
    if kind == "queue_full":
        return QueueFullError(int(detail))
    if kind == "shutting_down":
        return ShuttingDownError()
    if kind == "deadline":
        return DeadlineExceededError()
    if kind == "out_of_memory":
        return DeviceOutOfMemoryError(str(detail))
    if kind == "api_error":
        from app import errors

        name, message, image_index, headers = detail
        cls = getattr(errors, name, errors.InvalidImageError)
        exc: ApiError = cls.__new__(cls)
        Exception.__init__(exc, message)
        exc.message, exc.image_index, exc.headers = message, image_index, headers
        return exc
    if kind == "cancelled":
        return EngineUnavailableError("the engine dropped the request")
    return BatchFailedError(str(detail))
