"""The dynamic batcher with a fake model: grouping, limits, deadlines, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import (
    Batcher,
    BatchFailedError,
    BatchStats,
    DeadlineExceededError,
    QueueFullError,
    ShuttingDownError,
)
from tests.conftest import until


class FakeModel:
    """Doubles its inputs; records every batch; can be slowed, gated or made to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # a batch reached the model
        self.inside: Callable[[], None] | None = None  # called in the model's thread
        self.fail_on: int | None = None
        self.drop_one = False

    def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.entered.set()
        if self.inside is not None:
            self.inside()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("model exploded")
        out: list[int | BaseException] = [i * 2 for i in items]
        if self.drop_one:
            out.pop()
        return out


def make_batcher(
    model: FakeModel, stats: list[BatchStats] | None = None, workers: int = 1, **kw
) -> Batcher:
    params = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue_size": 64}
    params.update(kw)
    executor = ThreadPoolExecutor(workers, thread_name_prefix="fake-device")
    return Batcher(
        model, executor=executor, on_batch=stats.append if stats is not None else None, **params
    )


def deadline(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


async def test_concurrent_requests_share_one_forward_pass() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.2)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit([i], deadline()) for i in range(5)))
    assert results == [[0], [2], [4], [6], [8]]
    assert model.batches == [[0, 1, 2, 3, 4]]
    await batcher.stop(1)


async def test_batch_is_cut_at_max_batch_size() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=3, max_delay_s=0.2)
    batcher.start()
    results = await batcher.submit(list(range(7)), deadline())
    assert results == [0, 2, 4, 6, 8, 10, 12]
    assert [len(b) for b in model.batches] == [3, 3, 1]
    await batcher.stop(1)


async def test_partial_batch_runs_after_max_delay() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=32, max_delay_s=0.05)
    batcher.start()
    started = time.monotonic()
    assert await batcher.submit([1], deadline()) == [2]
    waited = time.monotonic() - started
    assert waited >= 0.04  # it waited for company; that it then ran alone is the answer above
    await batcher.stop(1)


async def test_full_batch_does_not_wait_for_the_delay() -> None:
    model = FakeModel()
    # A delay longer than the deadline: a batch that waited for it would be a 504.
    batcher = make_batcher(model, max_batch_size=2, max_delay_s=60.0)
    batcher.start()
    assert await batcher.submit([1, 2], deadline(30)) == [2, 4]
    await batcher.stop(1)


async def test_inference_runs_off_the_event_loop_on_one_worker() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=1, max_delay_s=0)
    loop = asyncio.get_running_loop()
    answered: list[bool] = []

    def needs_the_loop() -> None:
        # The model waits for the event loop to run a callback: were the model on the loop's
        # thread, the callback could only run after it returned (a deadlock, seen as False).
        ran = threading.Event()
        loop.call_soon_threadsafe(ran.set)
        answered.append(ran.wait(30))

    model.inside = needs_the_loop
    batcher.start()
    await asyncio.gather(batcher.submit([1], deadline(60)), batcher.submit([2], deadline(60)))
    assert answered == [True, True], "the event loop was blocked while the model ran"
    assert len(model.threads) == 1 and next(iter(model.threads)).startswith("fake-device")
    await batcher.stop(1)


async def test_full_queue_rejects_with_retry_after() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=1, max_delay_s=0, max_queue_size=2)
    batcher.start()
    first = asyncio.create_task(batcher.submit([1], deadline(60)))
    await until(model.entered.is_set, "the first item is inside the gated model")
    queued = asyncio.create_task(batcher.submit([2, 3], deadline(60)))
    await until(lambda: batcher.queue_depth == 2, "two items queued")
    with pytest.raises(QueueFullError) as info:
        await batcher.submit([4], deadline())
    assert info.value.retry_after_s >= 1
    model.gate.set()
    assert await first == [2]
    assert await queued == [4, 6]
    await batcher.stop(1)


async def test_request_past_deadline_is_answered_without_running() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=1, max_delay_s=0)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit([1], deadline(60)))
    await until(model.entered.is_set, "the first item is inside the gated model")
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([99], deadline(0.1))
    model.gate.set()
    await blocker
    # One more request after it: by its answer the batcher has passed the expired item.
    assert await batcher.submit([5], deadline(60)) == [10]
    assert all(99 not in b for b in model.batches), "an expired request reached the model"
    await batcher.stop(1)


async def test_failed_batch_fails_only_its_requests_and_serving_goes_on() -> None:
    model = FakeModel()
    model.fail_on = 13
    batcher = make_batcher(model, max_batch_size=2, max_delay_s=0.05)
    batcher.start()
    bad = batcher.submit([13, 1], deadline())
    with pytest.raises(BatchFailedError, match="RuntimeError"):
        await bad
    assert await batcher.submit([5], deadline()) == [10]
    await batcher.stop(1)


async def test_output_count_is_checked_against_input_count() -> None:
    model = FakeModel()
    model.drop_one = True
    batcher = make_batcher(model)
    batcher.start()
    with pytest.raises(BatchFailedError, match="2 outputs for 3 inputs"):
        await batcher.submit([1, 2, 3], deadline())
    await batcher.stop(1)


async def test_per_item_exception_fails_only_that_item() -> None:
    def handler(items: list[int]) -> list[int | BaseException]:
        return [ValueError("bad item") if i < 0 else i for i in items]

    batcher = Batcher(handler, max_batch_size=4, max_delay_s=0.05, max_queue_size=8)
    batcher.start()
    good, bad = await asyncio.gather(
        batcher.submit([1], deadline()), batcher.submit([-1], deadline()), return_exceptions=True
    )
    assert good == [1]
    assert isinstance(bad, ValueError)
    await batcher.stop(1)


async def test_shutdown_stops_intake_and_finishes_in_flight_work() -> None:
    model = FakeModel(delay_s=0.1)
    batcher = make_batcher(model, max_batch_size=2, max_delay_s=0)
    batcher.start()
    in_flight = [asyncio.create_task(batcher.submit([i], deadline())) for i in range(5)]
    await asyncio.sleep(0.02)
    stopping = asyncio.create_task(batcher.stop(5))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDownError):
        await batcher.submit([100], deadline())
    await stopping
    assert [await t for t in in_flight] == [[0], [2], [4], [6], [8]]


async def test_batch_stats_report_size_and_queue_wait() -> None:
    stats: list[BatchStats] = []
    model = FakeModel()
    batcher = make_batcher(model, stats, max_batch_size=4, max_delay_s=0.05)
    batcher.start()
    await batcher.submit([1, 2, 3], deadline())
    assert len(stats) == 1
    assert stats[0].size == 3 and stats[0].ok
    assert all(w >= 0.04 for w in stats[0].queue_waits_s)
    await batcher.stop(1)


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        Batcher(lambda items: items, max_batch_size=0, max_delay_s=0, max_queue_size=1)


class OverlapProbe:
    """Counts how many batches run at the same moment. A batch waits (for a state, not a
    time) until `want` batches run at once, so an overlap that is allowed surely happens."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.changed = threading.Condition()
        self.running = 0
        self.peak = 0

    def __call__(self, items: list[int]) -> list[int]:
        with self.changed:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.peak >= self.want, timeout=30)
            self.running -= 1
        return items


@pytest.mark.parametrize("concurrent", [1, 2])
async def test_concurrent_batches_overlap_only_when_allowed(concurrent: int) -> None:
    probe = OverlapProbe(want=concurrent)
    batcher = Batcher(
        probe,
        max_batch_size=2,
        max_delay_s=0,
        max_queue_size=16,
        executor=ThreadPoolExecutor(concurrent),
        max_concurrent_batches=concurrent,
    )
    batcher.start()
    results = await asyncio.gather(*(batcher.submit([i], deadline()) for i in range(6)))
    assert results == [[i] for i in range(6)]
    assert probe.peak == concurrent
    await batcher.stop(2)


async def test_in_flight_counts_items_of_every_running_batch() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = Batcher(
        model,
        max_batch_size=2,
        max_delay_s=0,
        max_queue_size=16,
        executor=ThreadPoolExecutor(2),
        max_concurrent_batches=2,
    )
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit([i], deadline(60))) for i in range(4)]
    await until(lambda: batcher.in_flight == 4, "both batches of two running")
    assert batcher.in_flight == 4 and batcher.queue_depth == 0
    assert batcher.running_for_s > 0
    model.gate.set()
    await asyncio.gather(*tasks)
    assert batcher.in_flight == 0 and batcher.running_for_s == 0
    await batcher.stop(1)


async def _behind_a_gated_batch(
    first_deadline_s: float = 5.0, **kw
) -> tuple[FakeModel, Batcher, asyncio.Task]:
    """A batcher of one image per batch whose first batch (item 1) is inside the model, held
    there until `model.gate` is set."""
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=1, max_delay_s=0, **kw)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit([1], deadline(first_deadline_s)))
    await asyncio.sleep(0.05)
    return model, batcher, blocker


async def test_expired_requests_leave_the_queue_at_once_while_a_batch_runs() -> None:
    """Dead work counts for nothing: a burst that expired behind a long batch no longer fills
    the queue (429), Retry-After or the queue-depth gauge."""
    model, batcher, blocker = await _behind_a_gated_batch(max_queue_size=4)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit([2, 3, 4, 5], deadline(0.05))
    assert batcher.queue_depth == 0
    assert batcher.in_flight == 1
    assert batcher.retry_after_s() == 1
    live = asyncio.create_task(batcher.submit([6, 7, 8, 9], deadline()))  # a whole queue
    await asyncio.sleep(0.01)
    assert not live.done(), "live work was refused because of expired work"
    assert batcher.queue_depth == 4
    model.gate.set()
    assert await blocker == [2]
    assert await live == [12, 14, 16, 18]
    assert all(i not in b for b in model.batches for i in (2, 3, 4, 5))
    await batcher.stop(1)


async def test_cancelled_request_leaves_the_queue_at_once() -> None:
    model, batcher, blocker = await _behind_a_gated_batch()
    gone = asyncio.create_task(batcher.submit([2, 3], deadline()))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 2
    gone.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert batcher.queue_depth == 0
    model.gate.set()
    await blocker
    await asyncio.sleep(0.05)
    assert model.batches == [[1]]
    await batcher.stop(1)


async def test_stop_past_its_timeout_answers_every_open_request() -> None:
    """A forward pass that does not end within the drain: its requests and the queued ones are
    all answered ShuttingDownError at the timeout, none is left waiting."""
    # The gate is not set before the stop: the batch outlives the drain.
    model, batcher, running = await _behind_a_gated_batch(first_deadline_s=60)
    queued = asyncio.create_task(batcher.submit([2], deadline(60)))
    await asyncio.sleep(0.01)
    await batcher.stop(0.1)
    for task in (running, queued):
        with pytest.raises(ShuttingDownError):
            await asyncio.wait_for(task, 2)
    model.gate.set()


async def test_many_item_submission_shares_batches_with_a_later_request() -> None:
    """Fair interleaving: a request of 24 items (a tiled image's tiles) does not make a
    request that arrives behind it wait for all of them; batches alternate between the two."""
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.0)
    batcher.start()
    try:
        # A first batch occupies the (single) slot, so both requests are queued together.
        first = asyncio.create_task(batcher.submit([1000], deadline()))
        while not model.batches:
            await asyncio.sleep(0.005)
        big = asyncio.create_task(batcher.submit(list(range(100, 124)), deadline()))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(batcher.submit([1, 2, 3], deadline()))
        await asyncio.sleep(0.01)
        model.gate.set()
        assert await small == [2, 4, 6]
        assert await big == [i * 2 for i in range(100, 124)]
        await first
    finally:
        await batcher.stop(5)
    # The batch after the first one holds the small request's three items, each beside one
    # of the big request's (round-robin), not the big request's first eight.
    second = model.batches[1]
    assert sorted(second) == [1, 2, 3, 100, 101, 102, 103, 104]
    assert second[:6] == [100, 1, 101, 2, 102, 3]
    # The big request's 24 items ran in ceil(27 / 8) = 4 batches after the first, full but one.
    assert [len(b) for b in model.batches[1:]] == [8, 8, 8, 3]
    assert sorted(x for b in model.batches[1:] for x in b) == [1, 2, 3, *range(100, 124)]


async def test_items_of_one_submission_keep_their_order_across_batches() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.0)
    batcher.start()
    try:
        assert await batcher.submit(list(range(24)), deadline()) == [i * 2 for i in range(24)]
    finally:
        await batcher.stop(5)
    assert model.batches == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


async def _ahead_batcher_running_one() -> tuple[FakeModel, Batcher, asyncio.Task]:
    """A batcher with ahead_only_full, two batches of two at most, whose first batch ([1, 2])
    is inside the model, held there until `model.gate` is set."""
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(
        model, workers=2, max_batch_size=2, max_delay_s=0, max_concurrent_batches=2,
        ahead_only_full=True,
    )  # fmt: skip
    batcher.start()
    first = asyncio.create_task(batcher.submit([1, 2], deadline(30)))
    await until(lambda: model.batches == [[1, 2]], "the first batch inside the model")
    return model, batcher, first


async def test_a_full_batch_goes_ahead_while_another_runs() -> None:
    """ahead_only_full (the CPU's default): a queued full batch is handed over at once, so that
    its pre-processing overlaps the running forward pass."""
    model, batcher, first = await _ahead_batcher_running_one()
    second = asyncio.create_task(batcher.submit([3, 4], deadline(30)))
    await until(lambda: len(model.batches) == 2, "the full second batch handed over")
    assert batcher.in_flight == 4
    model.gate.set()
    assert await first == [2, 4] and await second == [6, 8]
    await batcher.stop(1)


async def test_a_partial_batch_waits_for_the_running_one_to_end() -> None:
    """ahead_only_full: a partial batch is not handed over while another runs (it would split
    what one batch can carry); it goes, filled meanwhile, once the device is free."""
    model, batcher, first = await _ahead_batcher_running_one()
    lone = asyncio.create_task(batcher.submit([3], deadline(30)))
    await asyncio.sleep(0.3)  # max_delay_s is 0: without the rule it would have gone at once
    assert model.batches == [[1, 2]] and batcher.queue_depth == 1
    later = asyncio.create_task(batcher.submit([5], deadline(30)))
    await until(lambda: len(model.batches) == 2, "the filled second batch handed over")
    assert model.batches[1] == [3, 5]
    model.gate.set()
    assert await first == [2, 4] and await lone == [6] and await later == [10]
    await batcher.stop(1)


async def test_a_partial_batch_goes_when_the_device_frees() -> None:
    model, batcher, first = await _ahead_batcher_running_one()
    lone = asyncio.create_task(batcher.submit([3], deadline(30)))
    await asyncio.sleep(0.2)
    assert len(model.batches) == 1
    model.gate.set()
    assert await first == [2, 4] and await lone == [6]
    assert model.batches == [[1, 2], [3]]
    await batcher.stop(1)
