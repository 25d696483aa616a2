"""Several engines (one per GPU) behind the batcher's one handler: each batch goes to the engine
with the fewest batches in flight.

Each engine takes up to `batches_per_engine` batches at once (2: one is prepared while another
runs), and the batcher is told to hand over at most that many times the number of engines, so a
call always finds a free engine; the wait below only guards against a caller that ignores this.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from app.engine.tasks import ModelInfo

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


class BatchRunner(Protocol[T_contra, R_co]):
    """What the pool needs of an engine (tests pass fakes)."""

    @property
    def info(self) -> ModelInfo: ...

    def run_batch(self, tasks: Sequence[T_contra]) -> Sequence[R_co]: ...

    def memory_usage(self) -> list[tuple[str, str, float]]: ...


class EnginePool(Generic[T, R]):
    def __init__(self, engines: Sequence[BatchRunner[T, R]], batches_per_engine: int = 1) -> None:
        if not engines or batches_per_engine < 1:
            raise ValueError("an engine pool needs at least one engine and one batch per engine")
        self.engines = list(engines)
        self.batches_per_engine = batches_per_engine
        self._load = [0] * len(self.engines)
        self._turn = 0  # where the search for the least loaded engine starts: ties rotate
        self._free = threading.Condition()
        first = self.engines[0].info
        devices = ",".join(e.info.device for e in self.engines)
        buckets = tuple(b for e in self.engines for b in e.info.buckets)
        self.info = dataclasses.replace(first, device=devices, buckets=buckets)

    @property
    def max_concurrent_batches(self) -> int:
        return len(self.engines) * self.batches_per_engine

    @property
    def batches_in_flight(self) -> list[int]:
        """Batches each engine is running now (for tests and diagnostics)."""
        with self._free:
            return list(self._load)

    def run_batch(self, tasks: Sequence[T]) -> Sequence[R]:
        index = self._acquire()
        try:
            return self.engines[index].run_batch(tasks)
        finally:
            self._release(index)

    def _acquire(self) -> int:
        with self._free:
            while True:
                n = len(self.engines)
                order = [(self._turn + k) % n for k in range(n)]
                index = min(order, key=lambda i: self._load[i])
                if self._load[index] < self.batches_per_engine:
                    self._load[index] += 1
                    self._turn = (index + 1) % n
                    return index
                self._free.wait()

    def _release(self, index: int) -> None:
        with self._free:
            self._load[index] -= 1
            self._free.notify()

    def memory_usage(self) -> list[tuple[str, str, float]]:
        readings: list[tuple[str, str, float]] = []
        seen: set[tuple[str, str]] = set()
        for engine in self.engines:
            for device, kind, value in engine.memory_usage():
                # CPU engines all report the one process's RSS: count it once.
                if (device, kind) in seen:
                    continue
                seen.add((device, kind))
                readings.append((device, kind, value))
        return readings
