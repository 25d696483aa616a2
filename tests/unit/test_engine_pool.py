"""The engine pool with fake engines: batches spread over devices, no engine past its share,
memory readings of every device."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.engine.pool import EnginePool
from app.engine.tasks import ModelInfo


class FakeEngine:
    def __init__(self, device: str, delay_s: float = 0.05) -> None:
        self.info = ModelInfo("m", "torch", device, "float16", {0: "a"}, "Fake")
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()
        self.running = self.peak = 0

    def run_batch(self, tasks: Sequence[int]) -> list[str]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.batches.append(list(tasks))
        time.sleep(self.delay_s)
        with self.lock:
            self.running -= 1
        return [f"{self.info.device}:{t}" for t in tasks]

    def memory_usage(self) -> list[tuple[str, str, float]]:
        return [(self.info.device, "allocated", 1.0)]


def test_concurrent_batches_are_spread_over_the_engines_within_their_share() -> None:
    engines = [FakeEngine("cuda:0"), FakeEngine("cuda:1")]
    pool = EnginePool(engines, batches_per_engine=2)
    assert pool.max_concurrent_batches == 4
    with ThreadPoolExecutor(4) as workers:
        results = list(workers.map(pool.run_batch, [[i] for i in range(8)]))
    assert sorted(r[0].split(":")[-1] for r in results) == [str(i) for i in range(8)]
    assert min(len(e.batches) for e in engines) >= 2
    assert [e.peak for e in engines] == [2, 2]  # both used, neither beyond its share
    assert pool.batches_in_flight == [0, 0]


def test_a_caller_beyond_the_pools_capacity_waits_for_a_free_engine() -> None:
    engines = [FakeEngine("cuda:0", delay_s=0.1)]
    pool = EnginePool(engines, batches_per_engine=1)
    with ThreadPoolExecutor(3) as workers:
        list(workers.map(pool.run_batch, [[1], [2], [3]]))
    assert engines[0].peak == 1 and len(engines[0].batches) == 3


def test_sequential_batches_take_turns_when_every_engine_is_idle() -> None:
    engines = [FakeEngine("cuda:0", 0), FakeEngine("cuda:1", 0), FakeEngine("cuda:2", 0)]
    pool = EnginePool(engines, batches_per_engine=2)
    for i in range(6):
        pool.run_batch([i])
    assert [e.batches for e in engines] == [[[0], [3]], [[1], [4]], [[2], [5]]]


def test_a_failing_engine_frees_its_slot_and_the_error_reaches_the_caller() -> None:
    engine = FakeEngine("cuda:0", 0)
    engine.run_batch = lambda tasks: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    pool = EnginePool([engine], batches_per_engine=1)
    with pytest.raises(RuntimeError, match="boom"):
        pool.run_batch([1])
    assert pool.batches_in_flight == [0]


def test_pool_reports_every_device_and_names_them_all_in_its_info() -> None:
    pool = EnginePool([FakeEngine("cuda:0"), FakeEngine("cuda:1")], batches_per_engine=2)
    assert pool.info.device == "cuda:0,cuda:1"
    assert pool.memory_usage() == [("cuda:0", "allocated", 1.0), ("cuda:1", "allocated", 1.0)]
    with pytest.raises(ValueError):
        EnginePool([], batches_per_engine=1)
