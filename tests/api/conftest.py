"""Fixtures of the in-process API tests: the real app and lifespan on the tiny model."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.engine.pipeline import Engine
from app.engine.tasks import DetectionTask, ImageDetections
from app.main import create_app


class CountingEngine(Engine):
    """The real engine, counting the images that reach the model, optionally slowed down."""

    delay_s = 0.0
    images_seen = 0
    batches_run = 0
    fail = False
    gate: threading.Event | None = None  # holds every batch until set
    entered = threading.Event()  # a batch reached the model

    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageDetections]:
        type(self).images_seen += len(tasks)
        type(self).entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        type(self).batches_run += 1
        if self.fail:
            raise RuntimeError("the model blew up")
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().run_batch(tasks)


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": model_dir,
        "max_batch_size": 8,
        "max_batch_delay_ms": 30,
        "default_threshold": 0.0,
        "allow_private_urls": True,
        "url_timeout_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def client_factory(tiny_model_dir: Path):
    stack: list[Any] = []

    async def make(**overrides: Any) -> tuple[httpx.AsyncClient, CountingEngine]:
        settings = make_settings(tiny_model_dir, **overrides)
        engine = CountingEngine.load(settings.model, name="tiny", device="cpu")
        CountingEngine.images_seen = 0
        CountingEngine.delay_s = 0.0
        CountingEngine.fail = False
        CountingEngine.gate = None
        app = create_app(settings, engine=engine)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await app.state.runtime.wait_ready()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
        stack.append((client, lifespan))
        CountingEngine.images_seen = 0  # forget the warm-up
        CountingEngine.entered = threading.Event()
        CountingEngine.batches_run = 0
        return client, engine

    yield make
    for client, lifespan in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def client(client_factory) -> AsyncIterator[httpx.AsyncClient]:
    c, _ = await client_factory()
    yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, type_: str, text: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["type"] == type_, body
    assert text in body["error"]["message"], body
    return body
