"""The batcher's low-priority lane (job tiles, issue 15): online items first, job tiles in the
places left, a configurable share for the jobs, a cap on job tiles per batch, and the idle gap
after job-only batches while online traffic comes."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.conftest import until
from tests.unit.test_batching import FakeModel, deadline, make_batcher


async def _behind_a_running_batch(low: list[int], online: list[int], **kw: object) -> FakeModel:
    """A first batch holds the single slot while `low`, then `online`, items queue up; then
    everything runs. The model, with the batches it saw."""
    model = FakeModel()
    model.gate = threading.Event()
    batcher = make_batcher(model, max_delay_s=0.0, **kw)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit([1000], deadline()))
        while not model.batches:
            await asyncio.sleep(0.005)
        job = asyncio.create_task(batcher.submit(low, deadline(), "low"))
        await asyncio.sleep(0.01)
        live = asyncio.create_task(batcher.submit(online, deadline()))
        await asyncio.sleep(0.01)
        model.gate.set()
        await first
        assert await live == [i * 2 for i in online]
        assert await job == [i * 2 for i in low]
    finally:
        await batcher.stop(5)
    return model


async def test_online_items_go_before_job_tiles_queued_earlier() -> None:
    model = await _behind_a_running_batch(
        list(range(100, 112)), [1, 2, 3], max_batch_size=8, max_low_per_batch=8
    )
    # The next batch: the three online items first, the job's tiles in the five places left.
    assert model.batches[1] == [1, 2, 3, 100, 101, 102, 103, 104]
    assert model.batches[2] == list(range(105, 112))


async def test_job_tiles_per_batch_are_capped() -> None:
    model = await _behind_a_running_batch(
        list(range(100, 106)), [1], max_batch_size=8, max_low_per_batch=2
    )
    assert [len(b) for b in model.batches[1:]] == [3, 2, 2]
    assert model.batches[1] == [1, 100, 101]


async def test_a_share_keeps_job_tiles_moving_under_saturating_online_load() -> None:
    model = await _behind_a_running_batch(
        [100, 101, 102], list(range(1, 9)), max_batch_size=4, low_share=0.5, max_low_per_batch=4
    )
    # Half of each batch for the jobs while both wait; online items fill what the jobs leave.
    assert model.batches[1] == [1, 2, 100, 101]
    assert model.batches[2] == [3, 4, 102, 5]


async def test_job_only_batches_leave_a_gap_that_online_requests_take() -> None:
    """With online traffic just seen, the job's next tile waits (a gap as long as a huge
    multiple of the last job batch) and an online request arriving meanwhile runs first;
    without the yield the job's next tile would already be running."""
    model = FakeModel(delay_s=0.01)
    batcher = make_batcher(
        model, max_batch_size=4, max_delay_s=0.0, max_low_per_batch=1, low_yield=1000.0
    )
    batcher.start()
    try:
        assert await batcher.submit([1], deadline()) == [2]
        job = asyncio.create_task(batcher.submit([100, 101], deadline(), "low"))
        await until(lambda: len(model.batches) == 2, "the job's first tile ran")
        assert await batcher.submit([2], deadline()) == [4]
        assert await job == [200, 202]
    finally:
        await batcher.stop(5)
    # [101] did not run alone before [2]: it rode in the online batch's free place.
    assert model.batches == [[1], [100], [2, 101]]


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
