"""The server's own limits: every uvicorn keyword comes from a setting, and uvicorn takes them."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from app.api.http.server_limits import HeaderGuardProtocol, uvicorn_limits
from app.config import Settings


def test_uvicorn_limits_come_from_the_settings(tiny_model_dir: Path) -> None:
    settings = Settings(
        model=tiny_model_dir,
        max_header_bytes=4096,
        header_timeout_s=3,
        max_connections=7,
        keep_alive_timeout_s=2,
        backlog=99,
    )
    limits = uvicorn_limits(settings)
    assert limits["limit_concurrency"] == 7
    assert limits["timeout_keep_alive"] == 2
    assert limits["backlog"] == 99
    assert limits["h11_max_incomplete_event_size"] == 4096
    assert limits["http"].func is HeaderGuardProtocol
    assert limits["http"].keywords == {"max_header_bytes": 4096, "header_timeout_s": 3}


def test_uvicorn_accepts_the_limits(tiny_model_dir: Path) -> None:
    async def app(scope, receive, send) -> None:  # pragma: no cover (never called)
        pass

    config = uvicorn.Config(app, **uvicorn_limits(Settings(model=tiny_model_dir)))
    config.load()
    assert config.limit_concurrency == 1024 and config.backlog == 2048
    assert config.http_protocol_class.func is HeaderGuardProtocol
