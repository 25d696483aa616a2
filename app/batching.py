"""Dynamic batcher: groups items of concurrent requests into one call of a batch handler.

It knows nothing of HTTP or models: a handler takes a list of items and returns one output
per item (or an exception instance for an item that failed alone). The handler runs on the
executor given (a thread per batch that may be in flight), never on the event loop.

Fairness: a batch is filled round-robin across the submissions waiting, one item from each in
turn, submissions in arrival order. A request that brings many items (a tiled image's tiles)
fills batches when it is alone, but a request arriving behind it takes a place in the next
batch formed instead of waiting for all of them: with k submissions waiting, each gets at
least floor(max_batch_size / k) places in every batch (one in each, when k exceeds it, the
oldest first).

Ahead: with `max_concurrent_batches` > 1 the next batch is handed over while others run (its
pre-processing overlaps their forward pass). With `ahead_only_full`, a batch handed over while
another runs must be full: a partial one waits for the device to be free (then `max_delay_s` as
usual), so that the overlap never splits work that one batch would have carried (onnxruntime
on the CPU, by default: tiles and a saturated queue overlap, light traffic batches as with one
in flight).

Priority: items submitted with priority "low" (the tiles of background jobs, app/jobs/) wait in
a lane of their own. They take the places of a batch that the online items waiting leave free,
and, with `low_share` > 0, at least that share of every batch while both kinds wait (so that a
saturated server still moves its jobs). Low items are not counted in the queue bound nor in
`queue_depth` (the 429 decision and Retry-After speak of online work; the job runner bounds
its own items in flight), and at most `max_low_per_batch` of them ride in one batch: a batch of
job tiles is what an online request that arrives meanwhile waits for. While online requests
keep coming (one in the last second), a batch of job tiles alone is followed by an idle gap of
`low_yield` times its duration (cut short when online items arrive): on a CPU the forward pass
takes every core, and the online requests' decoding and HTTP work need some of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Priority = Literal["online", "low"]

_ONLINE_RECENT_S = 1.0  # online traffic this recent makes job-only batches yield


class BatcherError(Exception):
    """Base of the errors a submitter may get back."""


class QueueFullError(BatcherError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(BatcherError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new work")


class DeadlineExceededError(BatcherError):
    def __init__(self) -> None:
        super().__init__("the request passed its deadline before the model could run it")


class BatchFailedError(BatcherError):
    """The batch holding this item raised; every item of that batch gets one of these."""


@dataclass(frozen=True)
class BatchStats:
    size: int
    queue_waits_s: list[float]
    run_s: float
    ok: bool


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float
    deadline: float
    group: int = 0  # the submission it came with (batches interleave submissions)
    low: bool = False  # the low-priority lane's


@dataclass
class _Ewma:
    value: float = 0.05
    alpha: float = 0.2

    def update(self, sample: float) -> None:
        self.value += self.alpha * (sample - self.value)


class Batcher(Generic[T, R]):
    def __init__(
        self,
        handler: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        executor: Executor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        max_concurrent_batches: int = 1,
        ahead_only_full: bool = False,
        low_share: float = 0.0,
        max_low_per_batch: int | None = None,
        low_yield: float = 0.0,
    ) -> None:
        """`max_concurrent_batches` > 1 lets the next batch be handed over while earlier ones
        run (pipelining stages of one device, or several devices); the executor must have as
        many workers, and the handler must be safe to call concurrently. `ahead_only_full`:
        only full batches are handed over while another runs. `low_share` and
        `max_low_per_batch`: the low-priority lane (see the module doc for both)."""
        if min(max_batch_size, max_queue_size, max_concurrent_batches) < 1 or max_delay_s < 0:
            raise ValueError(
                "max_batch_size, max_queue_size and max_concurrent_batches must be >= 1, "
                "max_delay_s >= 0"
            )
        if not 0.0 <= low_share <= 1.0 or (max_low_per_batch is not None and max_low_per_batch < 1):
            raise ValueError("low_share must be within 0..1 and max_low_per_batch >= 1")
        self.low_share = low_share
        self.low_yield = max(0.0, low_yield)
        self._last_online = -math.inf  # when online items last came in
        self._low_ended = 0.0  # when the last batch of job tiles alone ended, and its time
        self._low_run_s = 0.0
        self.max_low_per_batch = min(max_low_per_batch or max_batch_size, max_batch_size)
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._executor = executor
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._low: deque[_Pending[T, R]] = deque()  # the low-priority lane
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: dict[int, tuple[float, list[_Pending[T, R]]]] = {}  # id -> (started, batch)
        self._runners: set[asyncio.Task[None]] = set()
        self._batch_ids = 0
        self._groups = 0
        self._batch_time = _Ewma()
        self.ahead_only_full = ahead_only_full
        self._handed_over = 0  # batches handed to the handler and not yet ended

    # -- state ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Live items waiting for a batch: a request that passes its deadline or is cancelled
        takes its items out of the queue at that moment (see submit)."""
        return len(self._queue)

    @property
    def low_depth(self) -> int:
        """Low-priority items waiting (job tiles)."""
        return len(self._low)

    @property
    def in_flight(self) -> int:
        """Items inside the batches that are running now."""
        return sum(len(batch) for _, batch in self._running.values())

    @property
    def running_for_s(self) -> float:
        """How long the oldest batch running now has taken so far (0 when idle)."""
        if not self._running:
            return 0.0
        return time.monotonic() - min(started for started, _ in self._running.values())

    @property
    def accepting(self) -> bool:
        return self._task is not None and not self._closing

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, timeout_s: float) -> None:
        """Stop intake, let queued and running work finish within `timeout_s`, then end."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            logger.warning("batcher did not drain in %.1f s; failing what is left", timeout_s)
            self._task.cancel()
            # Every request still waiting is answered now, those of a batch that is still
            # running included (its thread cannot be stopped; its outputs are dropped).
            left = [
                *self._queue,
                *self._low,
                *(p for _, batch in self._running.values() for p in batch),
            ]
            self._queue.clear()
            self._low.clear()
            for pending in left:
                if not pending.future.done():
                    pending.future.set_exception(ShuttingDownError())

    # -- intake -----------------------------------------------------------------------------
    async def submit(
        self, items: Sequence[T], deadline: float, priority: Priority = "online"
    ) -> list[R]:
        """Queue `items` (all of one request) and wait for their outputs, in order.

        `deadline` is a time.monotonic() value. Raises QueueFullError, ShuttingDownError,
        DeadlineExceededError or BatchFailedError. Low-priority items go to their own lane
        (see the module doc) and are never refused for a full queue.
        """
        if not self.accepting:
            raise ShuttingDownError()
        low = priority == "low"
        if not low and len(self._queue) + len(items) > self.max_queue_size:
            raise QueueFullError(self.retry_after_s())
        if not low:
            self._last_online = time.monotonic()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._groups += 1
        group = self._groups
        pendings = [
            _Pending(item, loop.create_future(), now, deadline, group, low) for item in items
        ]
        (self._low if low else self._queue).extend(pendings)
        self._wake.set()
        futures = [p.future for p in pendings]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), max(0.0, deadline - now)))
        except TimeoutError:
            self._withdraw(pendings)
            raise DeadlineExceededError() from None
        except BaseException:  # cancelled (the client went away), or one of its items failed
            self._withdraw(pendings)
            raise

    def _withdraw(self, pendings: list[_Pending[T, R]]) -> None:
        """A request past its deadline, cancelled or failed: its items still queued leave the
        queue now, so that the queue's length (the 429 decision, Retry-After, the queue-depth
        gauge) counts live work only."""
        for p in pendings:
            if not p.future.done():
                p.future.cancel()
        ids = {id(p) for p in pendings}
        self._queue = deque(p for p in self._queue if id(p) not in ids)
        if self._low:
            self._low = deque(p for p in self._low if id(p) not in ids)

    def retry_after_s(self) -> int:
        """Seconds a rejected client should wait: the time to work off the current queue."""
        batches = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_time.value))

    # -- the loop ---------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                while not (self._queue or self._low):
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                # Wait for a free slot first: while every slot is busy, the queue keeps filling,
                # so the next batch forms full at once.
                await self._slots.acquire()
                await self._wait_for_full_or_free()
                await self._wait_to_fill()
                if self._low and not self._queue:
                    await self._yield_to_online()
                batch = self._take_batch()
                if not batch:
                    self._slots.release()
                    continue
                self._handed_over += 1
                runner = asyncio.get_running_loop().create_task(self._execute(batch))
                self._runners.add(runner)
                runner.add_done_callback(self._runners.discard)
        finally:
            if self._runners:
                await asyncio.gather(*self._runners, return_exceptions=True)

    async def _wait_for_full_or_free(self) -> None:
        """With ahead_only_full: while a batch runs, wait until a full batch is queued (low items
        counted as in _wait_to_fill) or none runs any more (each batch's end wakes the loop)."""
        while self.ahead_only_full and self._handed_over and not self._closing:
            low = min(len(self._low), self.max_low_per_batch)
            if not (self._queue or low) or len(self._queue) + low >= self.max_batch_size:
                return
            self._wake.clear()
            await self._wake.wait()

    async def _wait_to_fill(self) -> None:
        """Wait until a full batch is queued or the oldest item has waited max_delay_s (low
        items count up to what one batch may take of them)."""
        while not self._closing:
            low = min(len(self._low), self.max_low_per_batch)
            if not (self._queue or low) or len(self._queue) + low >= self.max_batch_size:
                return
            # The oldest live item: the one before it may have left meanwhile.
            oldest = min(lane[0].enqueued for lane in (self._queue, self._low) if lane)
            if not await self._woken_within(oldest + self.max_delay_s - time.monotonic()):
                return

    async def _yield_to_online(self) -> None:
        """Before a batch of job tiles alone: the idle gap after the last one while online
        requests keep coming (see the module doc); online items arriving end it at once."""
        if self.low_yield <= 0 or time.monotonic() - self._last_online > _ONLINE_RECENT_S:
            return
        resume = self._low_ended + self.low_yield * self._low_run_s
        while not self._queue and not self._closing:
            # The gap ends when it is over, or when the online traffic has stopped.
            until = min(resume, self._last_online + _ONLINE_RECENT_S)
            if not await self._woken_within(until - time.monotonic()):
                return

    async def _woken_within(self, remaining: float) -> bool:
        """Wait for the next wake-up (new items, closing) at most `remaining` seconds; False
        when the time ran out first (or was already over)."""
        if remaining <= 0:
            return False
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), remaining)
        except TimeoutError:
            return False
        return True

    def _take_batch(self) -> list[_Pending[T, R]]:
        """The next batch: live items, round-robin across submissions (see the module doc);
        online items first, low-priority ones in the places left (and their share)."""
        online = self._lanes(self._queue)
        low = self._lanes(self._low)
        low_cap = self.max_low_per_batch if low else 0
        reserved = min(low_cap, math.floor(self.low_share * self.max_batch_size)) if low else 0
        batch = self._round_robin(online, self.max_batch_size - reserved)
        batch += self._round_robin(low, min(low_cap, self.max_batch_size - len(batch)))
        if len(batch) < self.max_batch_size:  # a low share the jobs could not fill
            batch += self._round_robin(online, self.max_batch_size - len(batch))
        taken = {id(p) for p in batch}
        # What is left keeps its arrival order (answered and expired items leave the queue).
        self._queue = deque(p for p in self._queue if not p.future.done() and id(p) not in taken)
        if self._low:
            self._low = deque(p for p in self._low if not p.future.done() and id(p) not in taken)
        return batch

    @staticmethod
    def _lanes(queue: deque[_Pending[T, R]]) -> dict[int, deque[_Pending[T, R]]]:
        """The live items of `queue` by submission (expired ones are answered here)."""
        now = time.monotonic()
        lanes: dict[int, deque[_Pending[T, R]]] = {}
        for pending in queue:
            if pending.future.done():  # its request gave up (deadline or disconnect)
                continue
            if pending.deadline <= now:
                pending.future.set_exception(DeadlineExceededError())
                continue
            lanes.setdefault(pending.group, deque()).append(pending)
        return lanes

    @staticmethod
    def _round_robin(lanes: dict[int, deque[_Pending[T, R]]], places: int) -> list[_Pending[T, R]]:
        """Up to `places` items, one from each submission in turn (taken out of `lanes`)."""
        batch: list[_Pending[T, R]] = []
        while lanes and len(batch) < places:
            for group in list(lanes):
                lane = lanes[group]
                batch.append(lane.popleft())
                if not lane:
                    del lanes[group]
                if len(batch) == places:
                    break
        return batch

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._batch_ids += 1
        batch_id = self._batch_ids
        self._running[batch_id] = (started, batch)
        ok = True
        try:
            outputs = await loop.run_in_executor(
                self._executor, self._handler, [p.item for p in batch]
            )
            if len(outputs) != len(batch):
                raise BatchFailedError(
                    f"the model returned {len(outputs)} outputs for {len(batch)} inputs"
                )
        except Exception as exc:
            ok = False
            logger.exception("batch of %d failed", len(batch))
            reason = str(exc) if isinstance(exc, BatchFailedError) else type(exc).__name__
            for p in batch:
                if not p.future.done():
                    failure = BatchFailedError(f"inference failed: {reason}")
                    failure.__cause__ = exc
                    p.future.set_exception(failure)
        else:
            for p, out in zip(batch, outputs, strict=True):
                if p.future.done():
                    continue
                if isinstance(out, BaseException):
                    p.future.set_exception(out)
                else:
                    p.future.set_result(out)
        finally:
            del self._running[batch_id]
            self._handed_over -= 1
            self._slots.release()
            self._wake.set()  # a partial batch may be waiting for the device (ahead_only_full)
        run_s = time.monotonic() - started
        self._batch_time.update(run_s)
        if all(p.low for p in batch):
            self._low_ended, self._low_run_s = time.monotonic(), run_s
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), [started - p.enqueued for p in batch], run_s, ok))
