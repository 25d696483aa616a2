"""The resources the app's lifespan owns: model, batcher, fetcher, worker thread, state.

The model loads in the background so that /healthz answers at once and /readyz says 503
until the model is loaded and warmed.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from app.batching import Batcher, BatchStats
from app.config import Settings
from app.engine.build import build_engines
from app.engine.pipeline import DetectionTask, Engine, ImageDetections, ImageResult
from app.engine.pool import EnginePool
from app.fetch import Fetcher, FetchPolicy
from app.metrics import Metrics
from app.service import DetectionService

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "stuck", "draining", "failed"]


class Runtime:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._state: State = "loading"
        self.engine = engine  # the first device's engine (tests may inject one, loaded)
        self.pool: EnginePool[DetectionTask, ImageResult] | None = None
        self.service: DetectionService | None = None
        self.load_error: BaseException | None = None
        # One worker per batch in flight, made once the engines say how many that is.
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: Batcher[DetectionTask, ImageDetections] | None = None
        self._fetcher: Fetcher | None = None
        self._loader: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        """loading -> ready -> draining; "stuck" while a forward pass outlives the watchdog."""
        batcher = self._batcher
        if (
            self._state == "ready"
            and batcher is not None
            and batcher.running_for_s > self.settings.watchdog_s
        ):
            return "stuck"
        return self._state

    def start(self) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="model-loader")

    async def wait_ready(self) -> None:
        if self._loader is not None:
            await self._loader

    async def _load(self) -> None:
        s = self.settings
        try:
            if self.engine is None:
                engines = await asyncio.to_thread(build_engines, s)
            else:
                engines = [self.engine]
                sizes = sorted({1, s.max_batch_size})
                await asyncio.to_thread(self.engine.warmup, sizes)
        except Exception as exc:
            self._state = "failed"
            self.load_error = exc
            logger.critical("the model could not be loaded: %s", exc, exc_info=exc)
            return
        self.engine = engines[0]
        on_cuda = self.engine.backend.device.type == "cuda"
        per_engine = s.batches_in_flight or (2 if on_cuda else 1)
        pool: EnginePool[DetectionTask, ImageResult] = EnginePool(engines, per_engine)
        self.pool = pool
        self._executor = ThreadPoolExecutor(
            max_workers=pool.max_concurrent_batches, thread_name_prefix="inference"
        )
        batcher: Batcher[DetectionTask, ImageDetections] = Batcher(
            pool.run_batch,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_batch_delay_ms / 1e3,
            max_queue_size=s.max_queue_size,
            executor=self._executor,
            on_batch=self._record_batch,
            max_concurrent_batches=pool.max_concurrent_batches,
        )
        batcher.start()
        self._batcher = batcher
        self._fetcher = Fetcher(
            FetchPolicy(
                allow_private=s.allow_private_urls,
                allowed_hosts=s.allowed_url_host_set,
                max_bytes=s.max_upload_bytes,
                timeout_s=s.url_timeout_s,
                max_redirects=s.max_redirects,
                max_concurrent=s.max_concurrent_downloads,
            )
        )
        info = pool.info
        self.metrics.model_info.info(
            {
                "model": info.name,
                "backend": info.backend,
                "device": info.device,
                "dtype": info.dtype,
                "architecture": info.architecture,
            }
        )
        self.metrics.observe_queue(lambda: batcher.queue_depth, lambda: batcher.in_flight)
        self.metrics.observe_device_memory(pool.memory_usage)
        self.service = DetectionService(
            s,
            info,
            batcher,
            self._fetcher,
            self.metrics,
            jpeg_on_device=any(e.jpeg_decoder is not None for e in engines),
        )
        # Ready once the decode workers are up: their start-up is not the first request's.
        await asyncio.to_thread(self.service.wait_started)
        self._state = "ready"
        logger.info(
            "ready: %s on %s (%s), max batch %d, %d batch(es) in flight per device",
            info.name,
            info.device,
            info.dtype,
            s.max_batch_size,
            per_engine,
        )

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.batches.labels("ok" if stats.ok else "error").inc()

    async def stop(self) -> None:
        """Stop intake (503), finish queued and running work, release resources."""
        if self._state == "ready":
            self._state = "draining"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self._batcher is not None:
            await self._batcher.stop(self.settings.drain_timeout_s)
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self.service is not None:
            self.service.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped")
