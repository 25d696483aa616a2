"""The decoded-pixel budget: grants within capacity, first come first served, waits a bounded
time for room, gives back early releases; and the service admits by pixels before decoding."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from app.admission import BudgetExhaustedError, PixelBudget
from app.config import Settings
from app.engine.tasks import ModelInfo
from app.errors import DeadlineError, PayloadTooLargeError, QueueFullApiError
from app.images.pool import DecodePool
from app.metrics import Metrics
from app.options import DetectOptions
from app.service import DetectionService, ImageSource
from tests.conftest import shapes_image


async def test_grants_within_capacity_and_releases_on_exit() -> None:
    budget = PixelBudget(100)
    async with budget.hold(60, 0) as lease:
        assert budget.held == 60
        lease.release(50)  # reduced at decode time
        assert budget.held == 10
        async with budget.hold(90, 0):
            assert budget.held == 100
    assert budget.held == 0


async def test_refuses_after_waiting_when_no_room_comes() -> None:
    budget = PixelBudget(100)
    async with budget.hold(80, 0):
        with pytest.raises(
            BudgetExhaustedError, match="holds 80 decoded pixels of its budget of 100"
        ):
            async with budget.hold(30, 0.05):
                pass
    assert budget.held == 0 and not budget._waiters


async def test_a_waiter_gets_the_room_released_while_it_waits() -> None:
    budget = PixelBudget(100)
    order: list[str] = []

    async def second() -> None:
        async with budget.hold(70, 5):
            order.append("second")

    async with budget.hold(80, 0):
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        assert order == []
        order.append("first done")
    await waiting
    assert order == ["first done", "second"] and budget.held == 0


async def test_first_come_first_served() -> None:
    budget = PixelBudget(100)
    got: list[str] = []

    async def take(name: str, pixels: int) -> None:
        async with budget.hold(pixels, 5):
            got.append(name)
            await asyncio.sleep(0.01)

    async with budget.hold(60, 0):
        large = asyncio.create_task(take("large", 90))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(take("small", 10))  # would fit now, but is behind "large"
        await asyncio.sleep(0.01)
        assert got == []
    await asyncio.gather(large, small)
    assert got == ["large", "small"]


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    budget = PixelBudget(100)
    async with budget.hold(100, 0):
        waiting = asyncio.create_task(budget.hold(10, 5).__aenter__())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert budget.held == 0 and not budget._waiters


def test_a_request_larger_than_the_budget_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_settings_refuse_a_request_limit_over_the_server_budget(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="max_request_pixels"):
        Settings(model=tiny_model_dir, max_request_pixels=10, max_inflight_pixels=5)


class SpyPool(DecodePool):
    def __init__(self) -> None:  # no processes: records what would have been decoded
        self.calls: list[int] = []

    async def decode(self, data: bytes, **kw: object):  # type: ignore[override]
        self.calls.append(int(kw["index"]))  # type: ignore[call-overload]
        raise AssertionError("nothing should be decoded")

    def close(self) -> None:
        pass


def service(tiny_model_dir, **overrides: object) -> tuple[DetectionService, SpyPool]:
    settings = Settings(model=tiny_model_dir, decode_threads=1, **overrides)
    info = ModelInfo("tiny", "torch", "cpu", "float32", {0: "a"}, "RTDetr")
    svc = DetectionService(settings, info, None, None, Metrics())  # type: ignore[arg-type]
    svc._decode_pool.close()
    spy = SpyPool()
    svc._decode_pool = spy
    return svc, spy


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


async def test_request_over_its_pixel_limit_is_refused_before_any_decode(tiny_model_dir) -> None:
    svc, spy = service(tiny_model_dir, max_request_pixels=1_000_000)
    sources = [ImageSource(raw=png(1000, 600)), ImageSource(raw=png(1000, 600))]
    with pytest.raises(
        PayloadTooLargeError, match="2 images decode to 1200000 pixels, over the limit of 1000000"
    ):
        await svc.detect(sources, DetectOptions())
    assert spy.calls == [] and svc._pixels.held == 0


async def test_no_room_in_the_server_budget_is_429_with_retry_after(tiny_model_dir) -> None:
    svc, spy = service(tiny_model_dir, max_inflight_pixels=1_000_000, max_request_pixels=1_000_000)
    async with svc._pixels.hold(900_000, 0):
        with pytest.raises(QueueFullApiError) as refused:
            await svc.detect([ImageSource(raw=png(1000, 600))], DetectOptions())
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
    assert spy.calls == [] and svc._pixels.held == 0


async def test_no_decode_starts_after_the_deadline(tiny_model_dir) -> None:
    svc, spy = service(tiny_model_dir, request_timeout_s=1e-6, max_batch_delay_ms=0)
    # The request's own deadline (app/service.py) fires before any image is decoded.
    with pytest.raises(DeadlineError, match="the request passed its deadline"):
        await svc.detect([ImageSource(raw=shapes_image(64, 64))], DetectOptions())
    assert spy.calls == [] and svc._pixels.held == 0


async def test_a_decode_past_its_time_is_stopped_and_the_pool_goes_on() -> None:
    pool = DecodePool(1)
    try:
        slow = png(8000, 5000)  # 40 MP: far more than 10 ms of work
        with pytest.raises(
            DeadlineError, match="image 3: decoding took longer than 0.0 s and was stopped"
        ):
            await pool.decode(
                slow, max_pixels=10**8, index=3, target=None, resample=2, timeout_s=0.01
            )
        pixels = await pool.decode(
            shapes_image(64, 48), max_pixels=10**8, index=0, target=None, resample=2, timeout_s=30
        )
        assert pixels.shape == (48, 64, 3)
    finally:
        pool.close()


async def test_errors_cross_the_process_boundary_with_their_index() -> None:
    from app.errors import InvalidImageError

    pool = DecodePool(1)
    try:
        with pytest.raises(InvalidImageError) as raised:
            await pool.decode(
                b"garbage!", max_pixels=10**8, index=5, target=None, resample=2, timeout_s=30
            )
        assert raised.value.image_index == 5
        assert raised.value.message.startswith("image 5: not an image")
    finally:
        pool.close()
