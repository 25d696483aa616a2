"""One process (--no-engine-process, the in-process tests): the job runner as a task of the
app's lifespan, sending its tiles to the EngineHost's batcher directly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from app.config import Settings
from app.jobs.process import hold_lock
from app.jobs.runner import JobRunner
from app.jobs.store import JobStore
from app.jobs.url import url_downloader
from app.process.runtime import Runtime

logger = logging.getLogger(__name__)


async def start_local_runner(settings: Settings, runtime: Runtime) -> Callable[[], Awaitable[None]]:
    """Start the runner (once it holds the folder's lock); returns the function that stops it."""
    host = runtime.host
    assert host is not None
    stop = asyncio.Event()
    fetch, close_fetch = url_downloader(settings)

    async def run() -> None:
        lock = await hold_lock(settings.jobs_path, stop)
        if lock is None:
            return
        try:
            store = JobStore(settings.jobs_path)
            interrupted = await asyncio.to_thread(store.fail_interrupted)
            if interrupted:
                logger.warning("jobs interrupted by the last stop, now failed: %s", interrupted)
            runner = JobRunner(
                settings,
                store,
                host,
                lambda: host.pool.info if host.pool is not None else None,
                fetch,
            )
            await runner.run()
        finally:
            lock.close()

    task = asyncio.get_running_loop().create_task(run(), name="job-runner")

    async def stopper() -> None:
        stop.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await close_fetch()

    return stopper
