"""The front-end/engine boundary in one process: a RemoteEngine talking to an EngineServer over
a real unix socket and a real shared-memory arena, with a fake model behind the batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from app.batching import DeadlineExceededError, QueueFullError
from app.config import Settings
from app.engine.tasks import DetectionTask, ImageDetections, ImageResult, ModelInfo
from app.errors import InvalidImageError
from app.ipc.client import EngineUnavailableError, RemoteEngine
from app.ipc.server import EngineServer
from app.ipc.wire import ArenaAllocator
from app.metrics import Metrics
from app.process.engine_host import EngineHost
from tests.conftest import until

INFO = ModelInfo("fake", "fake", "cpu", "float32", {0: "a", 1: "b"}, "Fake")


class FakeEngine:
    """Answers each image with a checksum of the pixels it read (in `scores`) and its size."""

    info = INFO
    delay_s = 0.0
    refuse_index: int | None = None

    def __init__(self) -> None:
        self.gate: threading.Event | None = None  # holds every batch until set
        self.entered = threading.Event()  # a batch reached the model

    def run_batch(self, tasks: Sequence[DetectionTask]) -> list[ImageResult]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        out: list[ImageResult] = []
        for task in tasks:
            assert task.pixels is not None
            if self.refuse_index is not None and task.pixels[0, 0, 0] == 7:
                out.append(InvalidImageError("cannot be decoded", image_index=self.refuse_index))
                continue
            h, w = task.size
            checksum = float(task.pixels.astype(np.int64).sum())
            out.append(
                ImageDetections(
                    np.array([checksum]),
                    np.array([1]),
                    np.array([[0, 0, w, h]], np.float32),
                    len(tasks),
                    0.001,
                    0.0,
                )
            )
        return out

    def memory_usage(self) -> list[tuple[str, str, float]]:
        return []


class Pair:
    def __init__(
        self, remote: RemoteEngine, server: EngineServer, fake: FakeEngine, made: list
    ) -> None:
        self.remote, self.server, self.fake = remote, server, fake
        self.made = made  # (remote, server, stop event, serving task) of every pair


@pytest.fixture
async def make_pair(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator:
    made: list[tuple[RemoteEngine, EngineServer, asyncio.Event, asyncio.Task[None]]] = []

    async def make(arena_mb: int = 4, **overrides: object) -> Pair:
        values = {"model": tiny_model_dir, "max_batch_delay_ms": 5, **overrides}
        settings = Settings(**values)  # type: ignore[arg-type]
        fake = FakeEngine()
        host = EngineHost(settings, Metrics(), fake)
        await host.load()
        server = EngineServer(host, Metrics())
        path = str(tmp_path / f"engine-{len(made)}.sock")
        stop = asyncio.Event()
        serving = asyncio.get_running_loop().create_task(server.serve(path, stop))
        remote = RemoteEngine([path], arena_mb << 20)
        remote.start()
        deadline = time.monotonic() + 10
        while remote.state != "ready":
            assert time.monotonic() < deadline, "the remote engine never connected"
            await asyncio.sleep(0.01)
        made.append((remote, server, stop, serving))
        return Pair(remote, server, fake, made)

    yield make
    for remote, _, stop, serving in made:
        stop.set()
        await remote.stop(1)
        await asyncio.wait_for(serving, 10)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _arena_used(remote: RemoteEngine) -> int:
    (link,) = remote._links
    assert link.conn is not None
    return link.conn.allocator.used


async def test_pixels_cross_intact_through_shared_memory_and_inline(make_pair) -> None:
    pair = await make_pair(arena_mb=4)
    # 2 fit in the 4 MB arena; the 1500x1200 one (5.4 MB) does not and travels inline.
    images = [_image(480, 640, 1), _image(1500, 1200, 2), _image(37, 53, 3)]
    tasks = [DetectionTask(img, 0.5, 10) for img in images]
    outputs = await pair.remote.submit(tasks, time.monotonic() + 10)
    assert [float(o.scores[0]) for o in outputs] == [
        float(img.astype(np.int64).sum()) for img in images
    ]
    assert [o.boxes[0].tolist()[2:] for o in outputs] == [[640, 480], [1200, 1500], [53, 37]]
    assert pair.remote.info == INFO and pair.remote.max_batch_size == 8
    assert _arena_used(pair.remote) == 0  # every block freed on the answer


async def test_original_size_of_a_reduced_image_crosses_with_it(make_pair) -> None:
    # Pixels reduced at decode time must be answered in the original image's pixels.
    pair = await make_pair(arena_mb=4)
    small = _image(64, 64, 4)
    tasks = [
        DetectionTask(small, 0.5, 10, source_size=(4000, 6000)),  # in the arena
        DetectionTask(_image(1500, 1200, 5), 0.5, 10, source_size=(3000, 2400)),  # inline
        DetectionTask(small, 0.5, 10),
    ]
    outputs = await pair.remote.submit(tasks, time.monotonic() + 10)
    assert [o.boxes[0].tolist()[2:] for o in outputs] == [[6000, 4000], [2400, 3000], [64, 64]]


async def test_concurrent_requests_from_one_front_end_share_a_batch(make_pair) -> None:
    pair = await make_pair(max_batch_delay_ms=100)
    deadline = time.monotonic() + 10
    outs = await asyncio.gather(
        *(
            pair.remote.submit([DetectionTask(_image(64, 64, i), 0.5, 10)], deadline)
            for i in range(6)
        )
    )
    assert max(o[0].batch_size for o in outs) >= 4
    assert _arena_used(pair.remote) == 0


async def test_full_queue_in_the_engine_answers_queue_full_with_retry_after(make_pair) -> None:
    pair = await make_pair(
        max_queue_size=2, max_images_per_request=2, max_batch_size=1, max_batch_delay_ms=0
    )
    pair.fake.delay_s = 0.3
    deadline = time.monotonic() + 10
    results = await asyncio.gather(
        *(
            pair.remote.submit([DetectionTask(_image(32, 32, i), 0.5, 10)], deadline)
            for i in range(6)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert refused and all(r.retry_after_s >= 1 for r in refused)
    assert any(isinstance(r, list) for r in results)
    assert _arena_used(pair.remote) == 0


async def test_request_past_its_deadline_gets_deadline_exceeded(make_pair) -> None:
    pair = await make_pair(max_batch_size=1, max_batch_delay_ms=0)
    pair.fake.gate = threading.Event()
    slow = asyncio.ensure_future(
        pair.remote.submit([DetectionTask(_image(32, 32, 0), 0.5, 10)], time.monotonic() + 60)
    )
    await until(pair.fake.entered.is_set, "the first request is inside the gated model")
    with pytest.raises(DeadlineExceededError):
        await pair.remote.submit(
            [DetectionTask(_image(32, 32, 1), 0.5, 10)], time.monotonic() + 0.1
        )
    pair.fake.gate.set()
    await slow


async def test_an_image_error_keeps_its_type_index_and_message(make_pair) -> None:
    pair = await make_pair()
    pair.fake.refuse_index = 1
    bad = _image(16, 16, 0)
    bad[0, 0, 0] = 7
    good = _image(16, 16, 1)
    good[0, 0, 0] = 8
    with pytest.raises(InvalidImageError) as caught:
        await pair.remote.submit(
            [DetectionTask(good, 0.5, 10), DetectionTask(bad, 0.5, 10)], time.monotonic() + 5
        )
    assert caught.value.image_index == 1
    assert caught.value.message == "image 1: cannot be decoded"
    assert caught.value.status_code == 400


async def test_engine_gone_fails_held_requests_at_once_and_frees_their_blocks(make_pair) -> None:
    pair = await make_pair(max_batch_size=1, max_batch_delay_ms=0)
    pair.fake.gate = threading.Event()
    held = [
        asyncio.ensure_future(
            pair.remote.submit([DetectionTask(_image(64, 64, i), 0.5, 10)], time.monotonic() + 60)
        )
        for i in range(3)
    ]
    await until(pair.fake.entered.is_set, "a request is inside the gated model")
    (link,) = pair.remote._links
    conn = link.conn
    assert conn is not None
    await until(lambda: conn.allocator.used > 0 and len(conn.pending) == 3, "all three sent")
    for writer in list(pair.server._writers):  # what the engine's death looks like
        writer.transport.abort()
    results = await asyncio.gather(*held, return_exceptions=True)
    # Answered while the forward pass is still held: at once, not after it.
    assert not pair.fake.gate.is_set()
    pair.fake.gate.set()
    assert all(isinstance(r, EngineUnavailableError) for r in results), results
    assert conn.allocator.used == 0
    assert pair.remote.state in ("restarting", "ready")  # it reconnects by itself


def test_arena_allocator_first_fit_and_merging() -> None:
    arena = ArenaAllocator(1024)
    a = arena.allocate(100)  # 128 with alignment
    b = arena.allocate(200)  # 256
    c = arena.allocate(500)  # 512
    assert (a, b, c) == (0, 128, 384)
    assert arena.allocate(200) is None  # 128 left
    arena.release(b, 200)
    assert arena.allocate(129) == 128  # first fit, in b's place
    arena.release(128, 129)
    arena.release(a, 100)
    arena.release(c, 500)
    assert arena.free_ranges == [(0, 1024)] and arena.used == 0
    assert arena.allocate(1024) == 0


async def test_watchdog_in_the_engine_reaches_the_front_end_and_clears(make_pair) -> None:
    pair = await make_pair(watchdog_s=0.3, max_batch_size=1, max_batch_delay_ms=0)
    pair.fake.gate = threading.Event()  # the forward pass runs until released
    slow = asyncio.ensure_future(
        pair.remote.submit([DetectionTask(_image(16, 16, 0), 0.5, 10)], time.monotonic() + 60)
    )
    await until(lambda: pair.remote.state == "stuck", "the front end hears of the watchdog")
    assert not slow.done()
    pair.fake.gate.set()
    await slow
    await until(lambda: pair.remote.state == "ready", "the watchdog clears")


async def _until(predicate, timeout_s: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_cancelled_request_leaves_the_engines_queue_at_once(make_pair) -> None:
    """The front end's cancel (client gone, deadline) crosses to the engine, whose batcher
    drops the request's queued images while the batch in front of them still runs."""
    pair = await make_pair(max_batch_size=1, max_batch_delay_ms=0)
    batcher = pair.server.host.batcher
    pair.fake.delay_s = 1.0
    running = asyncio.ensure_future(
        pair.remote.submit([DetectionTask(_image(16, 16, 0), 0.5, 10)], time.monotonic() + 30)
    )
    await _until(lambda: batcher.in_flight == 1)
    queued = asyncio.ensure_future(
        pair.remote.submit(
            [DetectionTask(_image(16, 16, i), 0.5, 10) for i in (1, 2)], time.monotonic() + 30
        )
    )
    await _until(lambda: batcher.queue_depth == 2)
    queued.cancel()
    await _until(lambda: batcher.queue_depth == 0, timeout_s=0.9)
    assert batcher.in_flight == 1  # the batch in front still runs; its image finishes
    await running


async def test_a_draining_engine_takes_accepted_work_until_its_front_end_is_idle(
    make_pair,
) -> None:
    pair = await make_pair(drain_timeout_s=30)
    (link,) = pair.remote._links
    (stop,) = [s for r, _, s, _ in pair.made if r is pair.remote]
    serving = next(t for r, _, _, t in pair.made if r is pair.remote)
    stop.set()  # SIGTERM
    await _until(lambda: pair.remote.state == "draining")
    # A request the front end accepted before the drain still runs...
    (answer,) = await pair.remote.submit(
        [DetectionTask(_image(16, 16, 3), 0.5, 10)], time.monotonic() + 5
    )
    assert answer.boxes.shape == (1, 4)
    await asyncio.sleep(0.1)
    assert not serving.done(), "the engine stopped before its front end was idle"
    pair.remote.report_idle()  # ...and the engine stops once the front end has none open
    await asyncio.wait_for(asyncio.shield(serving), 5)
    assert link.state == "draining"  # a drained engine is not reported as restarting


async def test_an_engine_answer_later_than_the_deadline_is_not_waited_for(
    make_pair, monkeypatch
) -> None:
    """The front end's own timer: a request in a batch that runs past its deadline gets 504
    then; the engine's answer to the cancel that follows frees its blocks."""
    monkeypatch.setattr("app.ipc.client._DEADLINE_GRACE_S", 0.05)
    pair = await make_pair(max_batch_size=1, max_batch_delay_ms=0)
    pair.fake.delay_s = 1.0
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await pair.remote.submit([DetectionTask(_image(64, 64, 0), 0.5, 10)], started + 0.3)
    assert time.monotonic() - started < 0.9  # the timer, not the forward pass
    deadline = time.monotonic() + 5
    while _arena_used(pair.remote):
        assert time.monotonic() < deadline, "the abandoned request's blocks were not freed"
        await asyncio.sleep(0.02)


async def test_a_request_cancelled_while_waiting_frees_its_blocks_on_the_answer(
    make_pair,
) -> None:
    pair = await make_pair(max_batch_size=1, max_batch_delay_ms=0)
    pair.fake.delay_s = 0.5
    waiting = asyncio.ensure_future(
        pair.remote.submit([DetectionTask(_image(64, 64, 0), 0.5, 10)], time.monotonic() + 10)
    )
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    deadline = time.monotonic() + 5
    while _arena_used(pair.remote):
        assert time.monotonic() < deadline, "the blocks of a cancelled request were not freed"
        await asyncio.sleep(0.02)
    # The connection still serves.
    (out,) = await pair.remote.submit(
        [DetectionTask(_image(8, 8, 1), 0.5, 10)], time.monotonic() + 5
    )
    assert out.batch_size == 1


async def test_pixels_decoded_into_a_reserved_block_reach_the_engine_without_a_copy(
    make_pair,
) -> None:
    pair = await make_pair(arena_mb=4, max_batch_size=1, max_batch_delay_ms=0)
    image = _image(480, 640, 5)
    block = pair.remote.reserve(480, 640)
    assert block is not None
    block.pixels[:] = image  # what the decode worker does, through its own mapping
    one_block = ArenaAllocator.rounded(image.nbytes)
    assert _arena_used(pair.remote) == one_block
    pair.fake.gate = threading.Event()
    answer = asyncio.ensure_future(
        pair.remote.submit(
            [DetectionTask(block.pixels, 0.5, 10, arena_block=block)], time.monotonic() + 10
        )
    )
    await until(pair.fake.entered.is_set, "the image is inside the model")
    # Sent by offset: the arena still holds that one block, no second copy of the pixels.
    assert _arena_used(pair.remote) == one_block and block.taken
    pair.fake.gate.set()
    (out,) = await answer
    assert float(out.scores[0]) == float(image.astype(np.int64).sum())
    assert _arena_used(pair.remote) == 0  # freed with the answer


async def test_a_reserved_block_is_given_back_at_once_or_after_its_quarantine(make_pair) -> None:
    pair = await make_pair(arena_mb=4)
    block = pair.remote.reserve(100, 100)
    assert block is not None and _arena_used(pair.remote) > 0
    block.release()
    block.release()  # a second release (the request's own, after the decode's) is a no-op
    assert _arena_used(pair.remote) == 0
    # A decode that failed or was cancelled may still be writing: the block waits.
    block = pair.remote.reserve(100, 100)
    assert block is not None
    block.release(0.2)
    assert _arena_used(pair.remote) > 0
    await until(lambda: _arena_used(pair.remote) == 0, "the quarantined block is freed")
    # More than the arena holds: no block (the pixels then come back from the worker).
    assert pair.remote.reserve(2000, 2000) is None


async def test_a_block_of_an_engine_gone_since_is_copied_to_the_new_connection(
    make_pair,
) -> None:
    pair = await make_pair(arena_mb=4)
    image = _image(200, 300, 6)
    block = pair.remote.reserve(200, 300)
    assert block is not None
    block.pixels[:] = image
    (link,) = pair.remote._links
    old = link.conn
    for writer in list(pair.server._writers):  # the engine's death, as the front end sees it
        writer.transport.abort()
    await until(
        lambda: link.conn is not None and link.conn is not old and pair.remote.state == "ready",
        "the front end reconnected",
    )
    (out,) = await pair.remote.submit(
        [DetectionTask(block.pixels, 0.5, 10, arena_block=block)], time.monotonic() + 10
    )
    assert float(out.scores[0]) == float(image.astype(np.int64).sum())
    assert not block.taken  # the request gives it back (to the old arena)
    assert _arena_used(pair.remote) == 0


def _spied_service(pair: Pair, model: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A DetectionService over the pair's engine client, one decode worker; with the arena
    blocks it reserves and what each decode sent back (None: written into its block)."""
    from app.service import DetectionService

    settings = Settings(model=model, decode_threads=1)
    svc = DetectionService(settings, INFO, pair.remote, None, Metrics())  # type: ignore[arg-type]
    blocks: list = []
    decoded_back: list = []
    reserve, decode = pair.remote.reserve, svc._decode_pool.decode

    def reserve_spy(height: int, width: int):  # type: ignore[no-untyped-def]
        block = reserve(height, width)
        blocks.append(block)
        return block

    async def decode_spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        pixels = await decode(*args, **kwargs)
        decoded_back.append(pixels)
        return pixels

    monkeypatch.setattr(pair.remote, "reserve", reserve_spy)
    monkeypatch.setattr(svc._decode_pool, "decode", decode_spy)
    return svc, blocks, decoded_back


async def test_a_tiled_request_is_decoded_into_the_engines_arena(
    make_pair, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from PIL import Image as PILImage

    from app import service as service_module
    from app.options import DetectOptions
    from app.service import ImageSource
    from tests.conftest import shapes_image

    pair = await make_pair(arena_mb=4)
    svc, blocks, decoded_back = _spied_service(pair, tiny_model_dir, monkeypatch)
    monkeypatch.setattr(service_module, "QUARANTINE_S", 0.2)
    try:
        data = shapes_image(256, 192)
        one_tile = DetectOptions(tiling={"tile_size": 256, "overlap": 0.0})
        result = await svc.detect([ImageSource(raw=data)], one_tile)
        (image,) = result.images
        assert image.timings["tiles"] == 1
        decoded = np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))
        # The fake model scores each image by its pixels' sum: the engine read the decode.
        assert float(image.detections.scores[0]) == float(decoded.astype(np.int64).sum())
        assert len(blocks) == 1 and blocks[0] is not None and blocks[0].taken
        assert decoded_back == [None]  # written into the block: no pixels came back
        assert _arena_used(pair.remote) == 0
        # A decode that fails leaves its block quarantined, then free.
        with pytest.raises(InvalidImageError):
            await svc.detect([ImageSource(raw=data[: len(data) * 2 // 3])], one_tile)
        assert len(blocks) == 2 and _arena_used(pair.remote) > 0
        await until(lambda: _arena_used(pair.remote) == 0, "the failed decode's block is freed")
    finally:
        svc.close()


async def test_a_plain_image_is_decoded_straight_into_the_arena_at_the_models_input(
    make_pair, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only tiles: a plain request's image, reduced to the model's input while decoding,
    is written by its worker into an arena block (no pixels back through the worker's pipe,
    no copy at submission), and the engine reads exactly that decode."""
    from app.images.pool import _decode_in_worker
    from app.options import DetectOptions
    from app.service import ImageSource
    from tests.conftest import shapes_image

    pair = await make_pair(arena_mb=4)
    svc, blocks, decoded_back = _spied_service(pair, tiny_model_dir, monkeypatch)
    try:
        data = shapes_image(640, 480)
        target = svc._fit.target(480, 640)
        assert target is not None and target != (480, 640)
        result = await svc.detect([ImageSource(raw=data)], DetectOptions())
        (image,) = result.images
        assert [(b.height, b.width) for b in blocks] == [target] and blocks[0].taken
        assert decoded_back == [None]  # written into the block: no pixels came back
        expected = _decode_in_worker(data, 10**8, 0, target, svc._fit.resample)
        assert float(image.detections.scores[0]) == float(expected.astype(np.int64).sum())
        assert (image.width, image.height) == (640, 480)  # boxes in the original's pixels
        assert _arena_used(pair.remote) == 0
    finally:
        svc.close()


async def test_a_models_client_reserves_in_the_arena_of_the_engines_serving_it_now(
    make_pair,
) -> None:
    from app.models.router import ModelClient

    client = ModelClient("fake")
    assert client.reserve(10, 10) is None  # not loaded (any more): nothing to reserve in
    pair = await make_pair(arena_mb=4)
    client.target = pair.remote
    block = client.reserve(10, 10)
    assert block is not None and block.conn is pair.remote._links[0].conn
    block.release()
    assert _arena_used(pair.remote) == 0
