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
import functools
import itertools
import logging
import os
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
    Priority,
    QueueFullError,
    ShuttingDownError,
)
from app.engine.tasks import DetectionTask, DeviceOutOfMemoryError, ImageDetections, ModelInfo
from app.errors import ApiError
from app.ipc.wire import ArenaAllocator, ArenaRef, Channel, create_arena
from app.logging_setup import request_id_var

logger = logging.getLogger(__name__)

# Copies of larger images go to a worker thread so the event loop does not stall on them.
_INLINE_COPY_BYTES = 4 << 20
_RECONNECT_S = 0.02
# How long past its deadline a request waits for the engine's own 504 before giving up.
_DEADLINE_GRACE_S = 2.0


class EngineUnavailableError(BatcherError):
    """No engine process is connected, or the one holding the request died."""


@dataclass
class _Pending:
    future: asyncio.Future[list[ImageDetections]]
    blocks: list[tuple[int, int]]  # (offset, nbytes) in the connection's arena
    images: int
    abandoned: bool = False  # the request gave up waiting; the answer only frees its blocks


@dataclass
class _Conn:
    """One connection to an engine process, with the arena made for it. The arena's name is
    unlinked as soon as the engine has mapped it: the memory then lives exactly as long as
    the two mappings, so a process killed with SIGKILL leaks nothing in /dev/shm."""

    channel: Channel
    arena: shared_memory.SharedMemory
    allocator: ArenaAllocator
    pending: dict[int, _Pending] = field(default_factory=dict)
    outstanding: int = 0  # images sent and not answered yet (for choosing an engine)

    def release(self, pending: _Pending) -> None:
        for offset, nbytes in pending.blocks:
            self.allocator.release(offset, nbytes)
        pending.blocks = []
        self.outstanding -= pending.images


@dataclass(eq=False)
class Reservation:
    """A block of an engine connection's arena held for pixels not decoded yet: a decode
    worker writes them there (app/images/pool.py, through `arena`), and the request's
    submission sends the block's offset, no copy. Freed with the engine's answer once a
    submission took it; else by release()."""

    conn: _Conn
    offset: int
    height: int
    width: int
    arena: ArenaRef
    taken: bool = False  # a submission (or a release) owns the block now

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3

    @property
    def pixels(self) -> np.ndarray:
        """The block as uint8 [height, width, 3] (in this process's mapping)."""
        buf = self.conn.arena.buf
        assert buf is not None
        shape = (self.height, self.width, 3)
        return np.ndarray(shape, dtype=np.uint8, buffer=buf, offset=self.offset)

    def release(self, after_s: float = 0.0) -> None:
        """Give the block back (unless a submission took it), `after_s` from now: a decode
        that failed or was cancelled may still be writing it until its worker has stopped."""
        if self.taken:
            return
        self.taken = True
        if after_s > 0:
            asyncio.get_running_loop().call_later(
                after_s, self.conn.allocator.release, self.offset, self.nbytes
            )
        else:
            self.conn.allocator.release(self.offset, self.nbytes)


@dataclass
class _Link:
    """One engine process, across its restarts."""

    path: str
    conn: _Conn | None = None
    state: str = "loading"  # loading | ready | stuck | draining | restarting | failed
    failure: str | None = None  # why the engine could not load the model (state "failed")


class RemoteEngine:
    def __init__(
        self,
        socket_paths: Sequence[str],
        arena_bytes: int,
        on_connect: Callable[[ModelInfo, int, bool], None] | None = None,
        on_draining: Callable[[], None] | None = None,
    ) -> None:
        """`on_draining` is called when an engine starts draining (SIGTERM): the front end
        refuses new requests and calls report_idle() once those it accepted are answered."""
        self._links = [_Link(p) for p in socket_paths]
        self._arena_bytes = arena_bytes
        self._on_connect = on_connect
        self._on_draining = on_draining
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self.info: ModelInfo | None = None
        self.max_batch_size = 1
        self.jpeg_on_device = False
        self._closing = False

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        # Fail at start-up, with the message, when /dev/shm cannot hold an arena.
        create_arena(self._arena_bytes, unlink=True).close()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_connected(link), name=f"engine-link-{i}")
            for i, link in enumerate(self._links)
        ]

    async def stop(self, timeout_s: float) -> None:
        """Wait (bounded) for answers still due, then disconnect."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(
            link.conn is not None and link.conn.pending for link in self._links
        ):
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def engine_listening(self) -> bool:
        """Whether every engine's socket exists (it may still be a dead engine's)."""
        return all(os.path.exists(link.path) for link in self._links)

    def report_idle(self) -> None:
        """Tell every engine that this front end has no request open (while draining)."""
        for link in self._links:
            if link.conn is not None:
                link.conn.channel.send(("idle",))

    def _set_state(self, link: _Link, state: str) -> None:
        before, link.state = link.state, state
        if state == "draining" and before != "draining" and self._on_draining is not None:
            self._on_draining()

    @property
    def failure(self) -> str | None:
        """Why an engine could not load the model (--no-exit-on-load-failure), or None."""
        return next((link.failure for link in self._links if link.failure is not None), None)

    @property
    def state(self) -> str:
        """ready only when every engine is; else the first trouble found."""
        states = [link.state for link in self._links]
        for bad in ("failed", "draining", "restarting", "stuck", "loading"):
            if bad in states:
                return bad
        return "ready"

    # -- the connection -----------------------------------------------------------------------
    async def _keep_connected(self, link: _Link) -> None:
        """Connect, read answers until the engine goes, fail what it held, reconnect (the
        supervisor restarts a dead engine at the same socket path)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                _, channel = await loop.create_unix_connection(Channel, link.path)
            except OSError:
                await asyncio.sleep(_RECONNECT_S)
                continue
            arena = create_arena(self._arena_bytes)
            conn = None
            try:
                channel.send(("hello", arena.name))
                hello = await channel.next_message()
                arena.unlink()  # the engine has it mapped now (see _Conn)
                if hello[0] == "failed":
                    await self._hold_failure(link, channel, hello[1])
                    continue
                link.failure = None
                _, info, max_batch_size, jpeg_on_device, state = hello
                self.info, self.max_batch_size, self.jpeg_on_device = (
                    info,
                    max_batch_size,
                    jpeg_on_device,
                )
                conn = _Conn(channel, arena, ArenaAllocator(self._arena_bytes))
                link.conn = conn
                logger.info("connected to the engine at %s (%s)", link.path, state)
                if self._on_connect is not None:
                    self._on_connect(info, max_batch_size, jpeg_on_device)
                self._set_state(link, state)
                # Answers are dispatched as they arrive, inside the channel's data_received.
                channel.listen(functools.partial(self._dispatch, link, conn))
                await asyncio.shield(channel.closed)
                raise ConnectionError("the engine closed the connection")
            except (ConnectionError, OSError, ValueError) as exc:
                if conn is not None and link.state == "draining":
                    logger.info("the engine at %s has drained and stopped", link.path)
                elif conn is not None and not self._closing:
                    logger.error("lost the engine at %s: %s", link.path, exc or type(exc).__name__)
            finally:
                link.conn = None
                channel.on_message = None
                if conn is not None:
                    if link.state != "draining":  # a drained engine exits: not a restart
                        link.state = "restarting"
                    self._fail_all(conn)
                else:
                    with contextlib.suppress(OSError):
                        arena.unlink()
                channel.close()
                # Not arena.close(): a copy into it may still run on a thread. The mapping goes
                # with the last reference (the _Conn, held by that copy's coroutine).
            await asyncio.sleep(_RECONNECT_S)

    @staticmethod
    async def _hold_failure(link: _Link, channel: Channel, reason: str) -> None:
        """The engine could not load the model and stays up to say so: the link is "failed"
        with its reason until that engine goes."""
        if link.failure is None:
            logger.error("the engine at %s failed to start: %s", link.path, reason)
        link.state, link.failure = "failed", reason
        await asyncio.shield(channel.closed)  # until the engine process ends
        link.state = "restarting"

    def _dispatch(self, link: _Link, conn: _Conn, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "state":
            self._set_state(link, message[1])
            return
        pending = conn.pending.pop(message[1], None)
        if pending is None:
            return
        conn.release(pending)
        if pending.abandoned or pending.future.done():
            return
        if kind == "ok":
            pending.future.set_result(
                [
                    ImageDetections(scores, labels, boxes, batch, inference_s, post_s, tiles)
                    for scores, labels, boxes, batch, inference_s, post_s, tiles in message[2]
                ]
            )
        else:
            pending.future.set_exception(_error(message[2], message[3]))

    @staticmethod
    def _fail_all(conn: _Conn) -> None:
        """The engine is gone: every request it held fails with 503 (the client may retry
        once /readyz says 200 again)."""
        for pending in conn.pending.values():
            conn.release(pending)
            if not pending.abandoned and not pending.future.done():
                pending.future.set_exception(
                    EngineUnavailableError("the engine process stopped while running this request")
                )
        conn.pending.clear()

    # -- intake -------------------------------------------------------------------------------
    def _pick(self) -> _Conn:
        """The connection to the ready engine with the fewest images outstanding. A draining
        engine still takes the requests its front ends accepted before the drain (they refuse
        new ones at the door: app/api/http/deps.py)."""
        usable = [link for link in self._links if link.conn is not None]
        ready = [link for link in usable if link.state in ("ready", "stuck", "draining")]
        if not ready:
            if any(link.state == "draining" for link in self._links):
                raise ShuttingDownError()
            raise EngineUnavailableError("no engine process is ready; retry shortly")
        conns = [link.conn for link in ready if link.conn is not None]
        return min(conns, key=lambda c: c.outstanding)

    def reserve(self, height: int, width: int) -> Reservation | None:
        """A block for an image of height x width decoded later, in the arena of the engine
        that will run it; None when no engine is ready or its arena has no room (the pixels
        then come back from the decode worker and are copied at submission, or travel
        inline)."""
        if self._closing:
            return None
        try:
            conn = self._pick()
        except BatcherError:
            return None
        offset = conn.allocator.allocate(height * width * 3)
        if offset is None:
            return None
        return Reservation(conn, offset, height, width, ArenaRef.of(conn.arena))

    async def submit(
        self, tasks: Sequence[DetectionTask], deadline: float, priority: Priority = "online"
    ) -> list[ImageDetections]:
        """Same contract as Batcher.submit, plus EngineUnavailableError. Tasks whose pixels
        are in a Reservation (`arena_block`) go to its engine, by offset."""
        if self._closing:
            raise ShuttingDownError()
        conn = self._pick()
        live = {id(link.conn) for link in self._links if link.conn is not None}
        for task in tasks:
            block = task.arena_block
            if isinstance(block, Reservation) and not block.taken and id(block.conn) in live:
                conn = block.conn  # where its pixels already are
                break
        rid = next(self._ids)
        # A tiled image weighs its tiles in the choice of the least busy engine.
        images = sum(
            t.tiling.count(*t.pixels.shape[:2])
            if t.tiling is not None and t.pixels is not None
            else 1
            for t in tasks
        )
        pending = _Pending(asyncio.get_running_loop().create_future(), [], images)
        conn.pending[rid] = pending  # from here on the blocks are freed whatever happens
        conn.outstanding += images
        try:
            items = await self._place(conn, pending, tasks)
        except BaseException:
            if conn.pending.pop(rid, None) is not None:
                conn.release(pending)
            raise
        if pending.future.done():  # the engine went away during the copy
            pending.future.exception()  # retrieved: it is raised below as 503
            raise EngineUnavailableError("the engine process went away")
        message: tuple[Any, ...] = ("submit", rid, request_id_var.get(), deadline, items)
        if priority != "online":
            message += (priority,)
        conn.channel.send(message)
        # One timer on the answer's future rather than wait_for(shield(...)): two futures, a
        # task and their callbacks less per request. A cancelled wait cancels the future too,
        # which _dispatch then skips (the answer only frees the blocks).
        timeout = max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S
        timer = asyncio.get_running_loop().call_later(timeout, _expire, pending.future)
        try:
            await conn.channel.drained()
            return await pending.future
        except _Expired:
            self._abandon(conn, rid, pending)
            raise DeadlineExceededError() from None
        except asyncio.CancelledError:  # the client went away
            self._abandon(conn, rid, pending)
            raise
        except ConnectionError:
            raise EngineUnavailableError("the engine process went away") from None
        finally:
            timer.cancel()

    @staticmethod
    def _abandon(conn: _Conn, rid: int, pending: _Pending) -> None:
        pending.abandoned = True
        if not pending.future.done():
            pending.future.cancel()
        conn.channel.send(("cancel", rid))

    @staticmethod
    async def _place(
        conn: _Conn, pending: _Pending, tasks: Sequence[DetectionTask]
    ) -> list[tuple[Any, ...]]:
        """Each task as a message item; pixels copied into the arena where they fit."""
        buf = conn.arena.buf
        assert buf is not None
        items: list[tuple[Any, ...]] = []
        for task in tasks:
            options = (
                task.threshold,
                task.max_detections,
                task.class_ids,
                task.source_size,
                task.tiling,
            )
            if task.pixels is None:
                items.append(("jpeg", task.jpeg, *options))
                continue
            pixels = task.pixels
            height, width = int(pixels.shape[0]), int(pixels.shape[1])
            nbytes = height * width * 3
            block = task.arena_block
            if isinstance(block, Reservation) and block.conn is conn and not block.taken:
                # Decoded into this connection's arena already: the answer frees it.
                block.taken = True
                pending.blocks.append((block.offset, block.nbytes))
                items.append(("shm", block.offset, height, width, *options))
                continue
            # (A block in the arena of an engine that has gone since is copied from there.)
            offset = conn.allocator.allocate(nbytes)
            if offset is None:
                # The arena is full (many large images at once): this one travels inline.
                items.append(("inline", np.ascontiguousarray(pixels), *options))
                continue
            pending.blocks.append((offset, nbytes))
            view = np.ndarray((height, width, 3), dtype=np.uint8, buffer=buf, offset=offset)
            if nbytes > _INLINE_COPY_BYTES:
                await asyncio.to_thread(np.copyto, view, pixels)
            else:
                np.copyto(view, pixels)
            items.append(("shm", offset, height, width, *options))
        return items


class _Expired(Exception):
    """The engine did not answer by the request's deadline (plus the grace)."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


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
