"""The model side of the service, in whichever process holds it: the engines (one per device),
the pool, the batcher and its worker threads.

The engine process (app/ipc/server.py) serves one over a socket; with --no-engine-process (and
in the in-process API tests) app/process/runtime.py uses one directly, its batcher being the engine
client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from app.batching import Batcher, BatchStats, Priority, ShuttingDownError
from app.config import Settings, model_dir_problem
from app.engine.pool import BatchRunner, EnginePool
from app.engine.preprocess_spec import PreprocessSpec
from app.engine.tasks import DetectionTask, ImageDetections, ImageResult, ModelInfo
from app.metrics import Metrics

logger = logging.getLogger(__name__)

R = TypeVar("R")

_MAX_REASON_CHARS = 600


def describe_load_failure(model: Path, exc: BaseException) -> str:
    """One line for the log, /readyz and the 503s: the model folder and the cause."""
    detail = " ".join(str(exc).split())
    if len(detail) > _MAX_REASON_CHARS:
        detail = detail[:_MAX_REASON_CHARS] + "..."
    cause = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"the model at {model} could not be loaded: {cause}"


class ModelFolderError(FileNotFoundError):
    """The model folder is missing or incomplete (accepted by the settings only with
    --no-exit-on-load-failure)."""


class EngineHost:
    def __init__(
        self, settings: Settings, metrics: Metrics, engine: BatchRunner[Any, Any] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engines: list[BatchRunner[DetectionTask, ImageResult]] = []
        self._injected = engine
        self.pool: EnginePool[DetectionTask, ImageResult] | None = None
        self.batcher: Batcher[DetectionTask, ImageDetections] | None = None
        # The thread that makes every torch call of this process: load, warm-up, the tiles'
        # crops and merges, and the forward passes too where one batch is in flight (the CPU).
        # libgomp gives each thread that enters a parallel region an OpenMP team of its own,
        # and once its threads outnumber the CPUs it spins 100 iterations instead of ~300,000
        # before sleeping: every op of a forward pass then pays a futex wake-up. Measured on
        # 2 cores, torch, batch 8: 39 img/s with the model loaded and run on one thread, 22
        # with it loaded on one and run on another (tests/unit/test_engine_thread.py).
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._executor: ThreadPoolExecutor | None = None
        self._spec: PreprocessSpec | None = None

    async def load(self) -> None:
        """Build (or warm the injected engine), then start the batcher. Raises what loading
        raised."""
        s = self.settings
        problem = None if self._injected is not None else model_dir_problem(s.model)
        if problem is not None:
            raise ModelFolderError(problem)
        if self._injected is not None:
            engines = [self._injected]
            warmup = getattr(self._injected, "warmup", None)
            if warmup is not None:
                await self._on_torch_thread(warmup, sorted({1, s.max_batch_size}))
        elif s.backend == "null":
            from app.engine.null import NullEngine

            engines = [NullEngine.from_settings(s)]
        else:
            from app.engine.memory_budget import check_device_memory
            from app.models.repository import resolve

            await self._on_torch_thread(check_device_memory, s)
            engines = list(await self._on_torch_thread(resolve(s.model)[0].build_engines, s))
        self.engines = engines
        on_cuda = engines[0].info.device.startswith("cuda")
        # Two batches in flight: the next one is prepared while the current one runs. On the
        # CPU by default only with onnxruntime, and only a full next batch goes ahead (tiles, a
        # saturated queue: no gap between forward passes; a partial one waits for the device,
        # to fill meanwhile). Torch's CPU forward shares its OpenMP threads with the
        # pre-processing: there the overlap measured slower (README, tiled inference).
        overlap_on_cpu = engines[0].info.backend == "onnx"
        per_engine = s.batches_in_flight or (2 if on_cuda or overlap_on_cpu else 1)
        ahead_only_full = s.batches_in_flight is None and not on_cuda and overlap_on_cpu
        pool: EnginePool[DetectionTask, ImageResult] = EnginePool(engines, per_engine)
        self.pool = pool
        self._executor = (
            self._torch_thread
            if pool.max_concurrent_batches == 1
            else ThreadPoolExecutor(
                max_workers=pool.max_concurrent_batches, thread_name_prefix="inference"
            )
        )
        batcher: Batcher[DetectionTask, ImageDetections] = Batcher(
            pool.run_batch,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_batch_delay_ms / 1e3,
            max_queue_size=s.max_queue_size,
            executor=self._executor,
            on_batch=self._record_batch,
            max_concurrent_batches=pool.max_concurrent_batches,
            ahead_only_full=ahead_only_full,
            low_share=s.job_batch_share,
            max_low_per_batch=s.job_tiles_per_batch(on_cuda),
            low_yield=s.job_yield,
        )
        batcher.start()
        self.batcher = batcher
        self.metrics.set_model_info(pool.info)
        self.metrics.observe_buckets(
            (b.device, b.batch_size, b.cuda_graph) for b in pool.info.buckets
        )
        logger.info(
            "ready: %s on %s (%s), max batch %d, %d batch(es) in flight per device%s",
            pool.info.name,
            pool.info.device,
            pool.info.dtype,
            s.max_batch_size,
            per_engine,
            " (the second only when full)" if ahead_only_full else "",
        )

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size

    async def submit(
        self, tasks: Sequence[DetectionTask], deadline: float, priority: Priority = "online"
    ) -> list[ImageDetections]:
        """The batcher's submit, with tiled tasks run as their tiles (one batcher submission:
        the tiles fill batches with each other and with other requests' images, and count as
        images in the queue bound and the deadline) and merged back into one answer each.
        `priority` "low": the batcher's low lane (job tiles, app/jobs/)."""
        batcher = self.batcher
        if batcher is None:
            raise ShuttingDownError()
        if not any(t.tiling is not None for t in tasks):
            return await batcher.submit(tasks, deadline, priority)
        from app.engine import tile_tasks

        spec = self._spec or PreprocessSpec.for_model(self.settings.model)
        self._spec = spec
        items, parts = await self._on_torch_thread(
            tile_tasks.expand, tasks, spec.output_size, spec.resample
        )
        self.metrics.tiles.inc(len(items) - sum(1 for t in tasks if t.tiling is None))
        outputs = await batcher.submit(items, deadline, priority)
        return await self._on_torch_thread(
            tile_tasks.collect, tasks, parts, outputs, self.info.device
        )

    async def _on_torch_thread(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, fn, *args)

    @property
    def info(self) -> ModelInfo:
        assert self.pool is not None, "load() first"
        return self.pool.info

    @property
    def jpeg_on_device(self) -> bool:
        return any(getattr(e, "jpeg_on_device", False) for e in self.engines)

    def stuck(self) -> bool:
        """A forward pass has run longer than the watchdog allows."""
        return self.batcher is not None and self.batcher.running_for_s > self.settings.watchdog_s

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        outcome = "ok" if stats.ok else "error"
        self.metrics.batches.labels(outcome).inc()
        self.metrics.model_batches.labels(self.settings.served_model_name, outcome).inc()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop intake, finish queued and running work within `timeout_s` (default: the drain
        timeout); past it every request still open is answered ShuttingDownError."""
        if self.batcher is not None:
            await self.batcher.stop(
                self.settings.drain_timeout_s if timeout_s is None else timeout_s
            )
        # The torch thread stays: a tiled request answered by the drain still merges there.
        if self._executor is not None and self._executor is not self._torch_thread:
            self._executor.shutdown(wait=False, cancel_futures=True)
