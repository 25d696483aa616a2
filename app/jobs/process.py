"""The job-runner process: started by the supervisor beside the engines (restarted when it
dies), a client of every engine process like a front end, and the only process that runs jobs.

It holds an exclusive lock on the job folder (runner.lock) while it lives: a second server
pointed at the same folder waits instead of running the same jobs, and the holder knows that a
job still marked running at its start was left by a runner that is gone (failed, with a reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from app.config import Settings

logger = logging.getLogger(__name__)

_LOCK_RETRY_S = 2.0
# Job chunks are a few tiles: a small arena (pixels that do not fit travel in the message).
_ARENA_BYTES = 64 << 20


def run_job_runner_process(settings: Settings, socket_paths: Sequence[str]) -> None:
    """Entry point of the spawned job-runner process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops it (SIGTERM)
    from app.logging_setup import configure_logging
    from app.process.supervisor import die_with_parent

    die_with_parent()
    # Reading and cutting tiles is background work: the front ends and the engine go first.
    os.nice(10)
    configure_logging(settings.log_level, settings.json_logs)
    asyncio.run(_main(settings, list(socket_paths)))
    logging.shutdown()
    os._exit(0)


async def hold_lock(folder: Path, stop: asyncio.Event) -> IO[bytes] | None:
    """The folder's runner lock, waiting while another process holds it; None if stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / "runner.lock").open("ab")
    warned = False
    while not stop.is_set():
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if not warned:
                logger.warning(
                    "another detr-serve runs the jobs of %s: waiting for it to stop", folder
                )
                warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _LOCK_RETRY_S)
    handle.close()
    return None


async def _main(settings: Settings, socket_paths: list[str]) -> None:
    from app.ipc.client import RemoteEngine
    from app.jobs.runner import JobRunner
    from app.jobs.store import JobStore
    from app.jobs.url import url_downloader

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    lock = await hold_lock(settings.jobs_path, stop)
    if lock is None:
        return
    store = JobStore(settings.jobs_path)
    interrupted = await asyncio.to_thread(store.fail_interrupted)
    if interrupted:
        logger.warning("jobs interrupted by the last stop, now failed: %s", ", ".join(interrupted))
    runner: JobRunner | None = None

    def draining() -> None:
        if runner is not None:
            runner.stop_taking()
        engine.report_idle()  # its chunks in flight finish or fail; it takes nothing new

    engine = RemoteEngine(socket_paths, _ARENA_BYTES, on_draining=draining)
    engine.start()
    fetch, close_fetch = url_downloader(settings)
    runner = JobRunner(settings, store, engine, lambda: engine.info, fetch)
    work = asyncio.get_running_loop().create_task(runner.run())
    await stop.wait()
    runner.stop_taking()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    await close_fetch()
    await engine.stop(1.0)
    lock.close()
