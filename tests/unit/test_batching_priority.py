"""The batcher's low-priority lane (job tiles, issue 15): online items first, job tiles in the
places left, a configurable share for the jobs, and a cap on job tiles per batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.batching import Batcher
from tests.unit.test_batching import FakeModel, deadline, make_batcher


async def _queue_behind_a_running_batch(
    batcher: Batcher, model: FakeModel, low: list[int], online: list[int]
) -> tuple[asyncio.Task, asyncio.Task]:
    """A first batch holds the single slot while low then online items queue up."""
    first = asyncio.create_task(batcher.submit([1000], deadline()))
    while not model.batches:
        await asyncio.sleep(0.005)
    job = asyncio.create_task(batcher.submit(low, deadline(), "low"))
    await asyncio.sleep(0.01)
    live = asyncio.create_task(batcher.submit(online, deadline()))
    await asyncio.sleep(0.01)
    assert model.gate is not None
    model.gate.set()
    await first
    return job, live


async def test_online_items_go_before_job_tiles_queued_earlier() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.0, max_low_per_batch=8)
    batcher.start()
    try:
        job, live = await _queue_behind_a_running_batch(
            batcher, model, list(range(100, 112)), [1, 2, 3]
        )
        assert await live == [2, 4, 6]
        assert await job == [i * 2 for i in range(100, 112)]
    finally:
        await batcher.stop(5)
    # The next batch: the three online items first, the job's tiles in the five places left.
    assert model.batches[1] == [1, 2, 3, 100, 101, 102, 103, 104]
    assert model.batches[2] == list(range(105, 112))


async def test_job_tiles_per_batch_are_capped() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.0, max_low_per_batch=2)
    batcher.start()
    try:
        job, live = await _queue_behind_a_running_batch(batcher, model, list(range(100, 106)), [1])
        await live
        await job
    finally:
        await batcher.stop(5)
    assert [len(b) for b in model.batches[1:]] == [3, 2, 2]
    assert model.batches[1] == [1, 100, 101]


async def test_a_share_keeps_job_tiles_moving_under_saturating_online_load() -> None:
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(
        model, max_batch_size=4, max_delay_s=0.0, low_share=0.5, max_low_per_batch=4
    )
    batcher.start()
    try:
        job, live = await _queue_behind_a_running_batch(
            batcher, model, [100, 101, 102], list(range(1, 9))
        )
        await live
        await job
    finally:
        await batcher.stop(5)
    # Half of each batch for the jobs while both wait; online items fill what the jobs leave.
    assert model.batches[1] == [1, 2, 100, 101]
    assert model.batches[2] == [3, 4, 102, 5]


async def test_job_tiles_are_not_refused_by_the_online_queue_bound() -> None:
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, max_queue_size=4, max_low_per_batch=4)
    batcher.start()
    try:
        assert await batcher.submit(list(range(10)), deadline(), "low") == [
            i * 2 for i in range(10)
        ]
        assert batcher.low_depth == 0 and batcher.queue_depth == 0
    finally:
        await batcher.stop(5)


def test_a_share_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="low_share"):
        make_batcher(FakeModel(), low_share=1.5)
