"""A URL job's image, downloaded by the runner under the SSRF rules of app/fetch.py (every
redirect checked, identity encoding, capped at max_job_bytes) and written to the job's file.

The download is held in memory once (the Fetcher reads a body whole, as for /v1/detect), up to
max_job_bytes: jobs over a few hundred MB should be uploaded (streamed to disk) instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from app.config import Settings
from app.errors import ApiError
from app.fetch import Fetcher, FetchPolicy
from app.jobs.runner import JobFailedError


def job_fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        allow_private=settings.allow_private_urls,
        allowed_hosts=settings.allowed_url_host_set,
        max_bytes=settings.max_job_bytes,
        timeout_s=max(settings.url_timeout_s, 300.0),
        max_redirects=settings.max_redirects,
        max_concurrent=max(1, settings.max_concurrent_jobs),
        max_buffered_bytes=settings.max_job_bytes * max(1, settings.max_concurrent_jobs),
    )


def url_downloader(
    settings: Settings,
) -> tuple[Callable[[str, Path], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """(fetch(url, path), close())."""
    fetcher = Fetcher(job_fetch_policy(settings))

    async def fetch(url: str, path: Path) -> None:
        try:
            body = await fetcher.fetch(url, index=0)
        except ApiError as exc:
            raise JobFailedError(
                f"the image URL: {exc.message.removeprefix('image 0: ')}"
            ) from None
        await asyncio.to_thread(path.write_bytes, body)

    return fetch, fetcher.aclose
