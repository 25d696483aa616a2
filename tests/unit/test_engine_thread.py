"""Where one batch is in flight (the CPU), every torch call of the engine's process runs on one
thread: loading, warm-up, the tiles' crops and merges and the forward passes. libgomp gives
each thread that enters a parallel region a team of its own, and with more OpenMP threads than
CPUs it nearly stops spinning between regions: a model loaded on one thread and run on another
ran at 22 against 39 img/s on 2 cores (app/process/engine_host.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.engine import tile_tasks
from app.engine.tasks import DetectionTask, ImageDetections, ImageResult, ModelInfo
from app.metrics import Metrics
from app.process.engine_host import EngineHost
from app.tile_geometry import TileSpec


class ThreadRecorder:
    """A model that notes the thread of each call made to it."""

    def __init__(self, backend: str) -> None:
        self.info = ModelInfo("fake", backend, "cpu", "float32", {0: "a"}, "Fake")
        self.threads: dict[str, set[int]] = {}

    def note(self, what: str) -> None:
        self.threads.setdefault(what, set()).add(threading.get_ident())

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        self.note("warmup")

    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageResult]:
        self.note("forward")
        return [
            ImageDetections(
                np.array([0.9]), np.array([0]), np.array([[1, 1, 9, 9]], np.float32), 1, 0.0, 0.0
            )
            for _ in tasks
        ]

    def memory_usage(self) -> list[tuple[str, str, float]]:
        return []


@pytest.fixture
def recorded_tiles(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[int]]:
    """tile_tasks.expand and collect, noting their threads."""
    threads: dict[str, set[int]] = {}
    for name in ("expand", "collect"):
        real = getattr(tile_tasks, name)

        def noting(*args: object, _real=real, _name=name) -> object:
            threads.setdefault(_name, set()).add(threading.get_ident())
            return _real(*args)

        monkeypatch.setattr(tile_tasks, name, noting)
    return threads


def _tasks() -> list[DetectionTask]:
    pixels = np.zeros((600, 700, 3), np.uint8)
    tiled = DetectionTask(pixels, 0.5, 100, tiling=TileSpec(tile_size=256))
    return [DetectionTask(pixels[:64, :64], 0.5, 100), tiled]


async def _serve(model: ThreadRecorder, model_dir: Path, requests: int) -> int:
    """Load `model` in an EngineHost, answer `requests` requests of _tasks(), stop; returns
    the batches the host let run at once."""
    host = EngineHost(Settings(model=model_dir, max_batch_delay_ms=1), Metrics(), model)
    await host.load()
    try:
        assert host.pool is not None
        for _ in range(requests):
            answers = await host.submit(_tasks(), time.monotonic() + 30)
            assert len(answers) == 2
        return host.pool.max_concurrent_batches
    finally:
        await host.stop(5)


async def test_one_thread_makes_every_model_call_on_the_cpu(
    tiny_model_dir: Path, recorded_tiles: dict[str, set[int]]
) -> None:
    model = ThreadRecorder("torch")
    assert await _serve(model, tiny_model_dir, requests=3) == 1
    calls = {**model.threads, **recorded_tiles}
    assert set(calls) == {"warmup", "forward", "expand", "collect"}
    threads = set().union(*calls.values())
    assert len(threads) == 1, calls
    assert threads != {threading.get_ident()}  # not the event loop's


async def test_overlapping_batches_keep_their_own_threads_and_load_on_the_torch_one(
    tiny_model_dir: Path, recorded_tiles: dict[str, set[int]]
) -> None:
    # onnxruntime on the CPU runs two batches at once (its threads are not OpenMP's): the
    # forward passes get threads of their own; the rest stays on the one thread.
    model = ThreadRecorder("onnx")
    assert await _serve(model, tiny_model_dir, requests=1) == 2
    (warmup,) = model.threads["warmup"]
    assert recorded_tiles["expand"] == recorded_tiles["collect"] == {warmup}
    assert warmup not in model.threads["forward"]
