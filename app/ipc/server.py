"""The engine process: owns the model (one device), the batcher and the forward pass, and
serves the front-end workers' RemoteEngines on a unix socket.

Queue decisions (429 with Retry-After), deadlines (504) and the watchdog are made here, where
the one queue is. Pixels are read in place from each front end's shared-memory arena.

Messages (pickled tuples; see wire.py):
  front end -> engine   ("hello", arena_name)
  supervisor -> engine  ("probe",)              answered ("state", state) or ("failed", reason)
                        ("submit", rid, request_id, deadline, [item, ...][, "low"])
                                               "low": job tiles (the batcher's low lane)
                        ("cancel", rid)                 the request gave up (deadline, client gone)
                        ("idle",)                       draining, and no request open there
  engine -> front end   ("hello", ModelInfo, max_batch_size, jpeg_on_device, state)
                        ("failed", reason)     instead of hello: the model could not be loaded
                                               (--no-exit-on-load-failure); nothing else follows
                        ("ok", rid, [(scores, labels, boxes, batch, inference_s, post_s,
                                     tiles), ...])
                        ("error", rid, kind, detail)
                        ("state", state)                       when ready/stuck/draining changes
  item: ("shm", offset, height, width, threshold, max_det, class_ids, source_size, tiling)
        ("inline", pixels, threshold, max_det, class_ids, source_size, tiling)  not in the arena
        ("jpeg", EncodedJpeg, threshold, max_det, class_ids, source_size, tiling) for the device
        (source_size: the original (height, width) when the pixels were reduced at decode;
        tiling: an app.tile_geometry.TileSpec, or None; a tiled image's pixels are its full size)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from app.config import Settings
from app.ipc.wire import Channel, attach_arena, read_message, write_message

if TYPE_CHECKING:
    from app.batching import Priority
    from app.engine.tasks import DetectionTask
    from app.metrics import Metrics
    from app.process.engine_host import EngineHost

logger = logging.getLogger(__name__)

# Exit status of an engine whose model could not be loaded: restarting cannot help.
LOAD_FAILED = 3
_GAUGE_PERIOD_S = 0.5


def run_engine_process(settings: Settings, socket_path: str) -> None:
    """Entry point of the spawned engine process."""
    # Ctrl-C reaches the whole process group; the supervisor stops the engine itself (SIGTERM:
    # the drain, see EngineServer.drain), so that the front ends' requests can still finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from app.logging_setup import configure_logging
    from app.process.supervisor import die_with_parent

    die_with_parent()

    configure_logging(settings.log_level, settings.json_logs)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(_main(settings, socket_path))
    logging.shutdown()
    # Not sys.exit: a forward pass that outlived the drain (its requests are answered already)
    # would hold the exit in the interpreter's join of the executor's threads.
    os._exit(code)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (uvicorn[standard] brings it on Linux and macOS), as in the
    front ends: every request costs the engine a socket read, a write and a few callbacks, and
    uvloop does those in C. None: asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _main(settings: Settings, socket_path: str) -> int:
    from app.metrics import Metrics
    from app.process.engine_host import EngineHost, describe_load_failure
    from app.process.malloc_tuning import freeze_startup_heap

    metrics = Metrics()
    host = EngineHost(settings, metrics)
    failure = None
    try:
        await host.load()
    except Exception as exc:
        failure = describe_load_failure(settings.model, exc)
        logger.critical("%s", failure, exc_info=exc)
        if settings.exit_on_load_failure:
            return LOAD_FAILED
    freeze_startup_heap()  # the model's objects: never walked again by full collections
    # SIGTERM while loading ends the process at once (the default action); from here on it
    # drains.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if failure is not None:
        await serve_load_failure(socket_path, failure, stop)
    else:
        await EngineServer(host, metrics).serve(socket_path, stop)
    return 0


# After the batcher has stopped, how long the last answers may take to be written.
_ANSWER_S = 1.0
_DRAIN_POLL_S = 0.01


async def serve_load_failure(socket_path: str, reason: str, stop: asyncio.Event) -> None:
    """--no-exit-on-load-failure: answer every front end ("failed", reason) until SIGTERM,
    so that they say why (/readyz, the 503s) instead of "loading" for ever. The connection
    stays open: its end tells the front end that this engine is gone."""
    connections: set[asyncio.StreamWriter] = set()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.add(writer)
        try:
            await read_message(reader)  # the hello; its arena is not mapped
            write_message(writer, ("failed", reason))
            await writer.drain()
            await reader.read()  # until the front end goes
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            connections.discard(writer)
            writer.close()

    server = await asyncio.start_unix_server(answer, path=socket_path)
    logger.info("engine serving its load failure on %s", socket_path)
    await stop.wait()
    server.close()
    for writer in list(connections):
        writer.close()
    with contextlib.suppress(OSError):
        os.unlink(socket_path)


class EngineServer:
    def __init__(self, host: EngineHost, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics
        self._writers: set[Channel] = set()  # front ends connected (hello done)
        self._idle: set[Channel] = set()  # front ends drained (said "idle")
        self._state = "ready"
        self._tasks: set[asyncio.Task[None]] = set()  # requests being answered
        self._connections: set[Channel] = set()
        self._gauges_due = False

    @property
    def state(self) -> str:
        if self._state == "ready" and self.host.stuck():
            return "stuck"
        return self._state

    async def serve(self, socket_path: str, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._connection, path=socket_path)
        logger.info("engine serving on %s", socket_path)
        watcher = asyncio.get_running_loop().create_task(self._watch())
        await stop.wait()
        await self.drain()
        server.close()
        watcher.cancel()
        for writer in list(self._writers):
            writer.close()
        if self._connections:  # each ends once what it queued is written
            await asyncio.wait([c.closed for c in self._connections], timeout=_ANSWER_S)
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        logger.info("engine stopped")

    async def drain(self) -> None:
        """SIGTERM: readiness 503 on every front end at once ("draining": they refuse new
        requests), the requests they had accepted still come in and are run, until every front
        end says it is idle or drain_timeout_s passes; then the batcher stops with what is left
        of that time, and every request still open is answered (503 past the timeout)."""
        timeout_s = self.host.settings.drain_timeout_s
        deadline = time.monotonic() + timeout_s
        logger.info("engine draining (up to %.1f s)", timeout_s)
        self._state = "draining"
        self._broadcast(("state", "draining"))
        batcher = self.host.batcher
        assert batcher is not None
        while time.monotonic() < deadline and not (
            self._writers <= self._idle and batcher.queue_depth == 0 and batcher.in_flight == 0
        ):
            await asyncio.sleep(_DRAIN_POLL_S)
        await self.host.stop(max(0.0, deadline - time.monotonic()))
        if self._tasks:  # their answers are written before the connections close
            await asyncio.wait(self._tasks, timeout=_ANSWER_S)

    async def _watch(self) -> None:
        """Refresh the gauges a scrape cannot compute, and tell the front ends when the
        watchdog trips or clears."""
        batcher = self.host.batcher
        assert batcher is not None
        pool = self.host.pool
        assert pool is not None
        last = self.state
        while True:
            self.metrics.refresh_engine_gauges(
                batcher.queue_depth, batcher.in_flight, pool.memory_usage
            )
            self.metrics.model_queue_depth.labels(self.host.settings.served_model_name).set(
                batcher.queue_depth
            )
            state = self.state
            if state != last:
                if state == "stuck":
                    logger.error("a forward pass has run past the watchdog: /readyz says 503")
                self._broadcast(("state", state))
                last = state
            await asyncio.sleep(_GAUGE_PERIOD_S)

    def _refresh_gauges_soon(self) -> None:
        """The queue gauges set once at the end of this turn of the loop, for all the requests
        that came or were answered in it (each set is a write to the metrics file). Scheduled
        before the answers' write (Channel.send schedules it after this), so that a scrape
        after an answer sees the queue as the answer left it."""
        if not self._gauges_due:
            self._gauges_due = True
            asyncio.get_running_loop().call_soon(self._refresh_gauges)

    def _refresh_gauges(self) -> None:
        self._gauges_due = False
        batcher = self.host.batcher
        if batcher is not None:
            self.metrics.queue_depth.set(batcher.queue_depth)
            self.metrics.in_flight.set(batcher.in_flight)

    def _broadcast(self, message: Any) -> None:
        for channel in list(self._writers):
            channel.send(message)

    def _connection(self) -> Channel:
        """A new front end's (or the supervisor's probe's) connection: its messages are handled
        as they arrive, in the channel's data_received (no task per connection or message)."""
        channel = Channel()
        self._connections.add(channel)
        session = _Session(self, channel)
        channel.listen(session.first)
        channel.closed.add_done_callback(session.ended)
        return channel

    async def _submit(
        self,
        channel: Channel,
        arena: mmap.mmap,
        rid: int,
        request_id: str,
        deadline: float,
        items: list[tuple[Any, ...]],
        priority: Priority = "online",
    ) -> None:
        from app.batching import (
            BatchFailedError,
            DeadlineExceededError,
            QueueFullError,
            ShuttingDownError,
        )
        from app.engine.tasks import DeviceOutOfMemoryError
        from app.errors import ApiError
        from app.logging_setup import request_id_var

        request_id_var.set(request_id)  # log lines of this request's batch carry its id
        batcher = self.host.batcher
        assert batcher is not None
        reply: tuple[Any, ...]
        try:
            tasks = [_task(arena, item) for item in items]
            # Tiled images run as their tiles; "low": job tiles (the batcher's low lane).
            pending = self.host.submit(tasks, deadline, priority)
            self._refresh_gauges_soon()
            outputs = await pending
            reply = (
                "ok",
                rid,
                [
                    (
                        o.scores,
                        o.labels,
                        o.boxes,
                        o.batch_size,
                        o.inference_s,
                        o.postprocess_s,
                        o.tiles,
                    )
                    for o in outputs
                ],
            )
        except asyncio.CancelledError:
            reply = ("error", rid, "cancelled", None)
        except QueueFullError as exc:
            reply = ("error", rid, "queue_full", exc.retry_after_s)
        except ShuttingDownError:
            reply = ("error", rid, "shutting_down", None)
        except DeadlineExceededError:
            reply = ("error", rid, "deadline", None)
        except BatchFailedError as exc:
            reply = ("error", rid, "batch_failed", str(exc))
        except DeviceOutOfMemoryError as exc:
            reply = ("error", rid, "out_of_memory", str(exc))
        except ApiError as exc:  # an image the device decoder and Pillow both refused
            detail = (type(exc).__name__, exc.message, exc.image_index, exc.headers)
            reply = ("error", rid, "api_error", detail)
        except Exception as exc:
            logger.exception("request failed in the engine")
            reply = ("error", rid, "batch_failed", f"inference failed: {type(exc).__name__}")
        # Before the answer, so that a scrape after it sees the queue as this answer left it.
        self._refresh_gauges_soon()
        # Always answer: the front end frees the request's arena blocks on the answer. The
        # answers of one batch leave together, in one write (Channel.send).
        channel.send(reply)


class _Session:
    """One connection's state in the engine: its arena and its requests being answered."""

    def __init__(self, server: EngineServer, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.arena: mmap.mmap | None = None
        self.running: dict[int, asyncio.Task[None]] = {}

    def first(self, hello: Any) -> None:
        server, channel = self.server, self.channel
        if isinstance(hello, tuple) and hello[0] == "probe":
            # The supervisor asks whether this model is up (app/models/manager.py).
            channel.send(("state", server.state))
            channel.close()
            return
        if not (isinstance(hello, tuple) and hello[0] == "hello"):
            channel.close()
            return
        self.arena = attach_arena(hello[1])
        host = server.host
        channel.send(
            ("hello", host.info, host.settings.max_batch_size, host.jpeg_on_device, server.state)
        )
        server._writers.add(channel)
        channel.on_message = self.message

    def message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            _, rid, request_id, deadline, items, *rest = message
            priority: Priority = "low" if rest and rest[0] == "low" else "online"
            assert self.arena is not None
            task = asyncio.get_running_loop().create_task(
                self.server._submit(
                    self.channel, self.arena, rid, request_id, deadline, items, priority
                )
            )
            self.running[rid] = task
            task.add_done_callback(functools.partial(_forget, self.running, rid))
            tasks = self.server._tasks
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "cancel":
            found = self.running.get(message[1])
            if found is not None:
                found.cancel()
        elif kind == "idle":
            self.server._idle.add(self.channel)

    def ended(self, _: object) -> None:
        """The front end went away (a worker restarted or stopped), or the engine closed."""
        server = self.server
        server._writers.discard(self.channel)
        server._idle.discard(self.channel)
        server._connections.discard(self.channel)
        for task in list(self.running.values()):
            task.cancel()
        # The arena is not closed here: a batch still running may read it. It is unmapped
        # when the last array on it is gone (see attach_arena).


def _forget(running: dict[int, asyncio.Task[None]], rid: int, _: object) -> None:
    running.pop(rid, None)


def _task(arena: mmap.mmap, item: tuple[Any, ...]) -> DetectionTask:
    from app.engine.tasks import DetectionTask

    kind = item[0]
    if kind == "shm":
        _, offset, height, width, threshold, max_det, class_ids, source, tiling = item
        pixels = np.ndarray((height, width, 3), dtype=np.uint8, buffer=arena, offset=offset)
        return DetectionTask(
            pixels, threshold, max_det, class_ids, source_size=source, tiling=tiling
        )
    if kind == "inline":
        _, pixels, threshold, max_det, class_ids, source, tiling = item
        return DetectionTask(
            pixels, threshold, max_det, class_ids, source_size=source, tiling=tiling
        )
    if kind == "jpeg":
        _, jpeg, threshold, max_det, class_ids, source, _tiling = item
        return DetectionTask(None, threshold, max_det, class_ids, jpeg=jpeg, source_size=source)
    raise ValueError(f"unknown item kind {kind!r}")
