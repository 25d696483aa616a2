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
from app.engine import DetectionTask, Engine, ImageDetections
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
        self.engine = engine
        self.service: DetectionService | None = None
        self.load_error: BaseException | None = None
        # One worker per device: the forward passes of one device never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
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
        loop = asyncio.get_running_loop()
        try:
            if self.engine is None:
                self.engine = await loop.run_in_executor(self._executor, self._load_engine)
            engine = self.engine
            sizes = sorted({1, s.max_batch_size})
            await loop.run_in_executor(self._executor, engine.warmup, sizes)
        except Exception as exc:
            self._state = "failed"
            self.load_error = exc
            logger.critical("the model could not be loaded: %s", exc, exc_info=exc)
            return
        batcher: Batcher[DetectionTask, ImageDetections] = Batcher(
            engine.run_batch,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_batch_delay_ms / 1e3,
            max_queue_size=s.max_queue_size,
            executor=self._executor,
            on_batch=self._record_batch,
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
        info = engine.info
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
        self.metrics.observe_device_memory(engine.memory_usage)
        self.service = DetectionService(s, info, batcher, self._fetcher, self.metrics)
        self._state = "ready"
        logger.info(
            "ready: %s on %s (%s), max batch %d",
            info.name,
            info.device,
            info.dtype,
            s.max_batch_size,
        )

    def _load_engine(self) -> Engine:
        import torch

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        return Engine.load(
            self.settings.model,
            name=self.settings.served_model_name,
            device=self.settings.device,
            dtype=self.settings.dtype,
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
        self._executor.shutdown(wait=False, cancel_futures=True)
        logger.info("stopped")
