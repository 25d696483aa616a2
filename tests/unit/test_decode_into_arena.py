"""A tiled image's pixels written by the decode worker straight into the front end's
shared-memory arena (app/images/pool.py `into`, app/ipc/wire.py ArenaRef): what lands there,
and the fallbacks when the worker cannot write there."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from app.errors import InvalidImageError
from app.images.pool import DecodePool, Into
from app.ipc.wire import ArenaRef, create_arena
from tests.conftest import shapes_image

ARENA = 4 << 20
OFFSET = 64 * 1000  # a block that does not start at the arena's beginning


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    pool = DecodePool(1)
    yield pool
    pool.close()


@pytest.fixture
def arena() -> Iterator:
    shm = create_arena(ARENA)
    yield shm
    shm.close()
    shm.unlink()


async def _decode(pool: DecodePool, data: bytes, into: Into, index: int = 0) -> np.ndarray | None:
    return await pool.decode(
        data, max_pixels=10**8, index=index, target=None, resample=2, timeout_s=30, into=into
    )


def _arena_bytes(shm) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.ndarray((ARENA,), dtype=np.uint8, buffer=shm.buf)


async def test_the_worker_writes_the_pixels_at_the_block_and_sends_nothing_back(
    pool: DecodePool, arena
) -> None:
    data = shapes_image(640, 360)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    into = Into(ArenaRef.of(arena), OFFSET, 360, 640)
    got = await _decode(pool, data, into)
    assert got is None
    view = np.ndarray((360, 640, 3), dtype=np.uint8, buffer=arena.buf, offset=OFFSET)
    assert np.array_equal(view, expected)
    everything = _arena_bytes(arena)
    assert not everything[:OFFSET].any()  # nothing written outside the block
    assert not everything[OFFSET + expected.nbytes :].any()


async def test_an_arena_the_worker_cannot_reach_gets_the_pixels_back(
    pool: DecodePool, arena
) -> None:
    data = shapes_image(320, 240)
    # The descriptor now names another file (a reconnection reused the number): refused.
    stale = dataclasses.replace(ArenaRef.of(arena), inode=ArenaRef.of(arena).inode + 1)
    got = await _decode(pool, data, Into(stale, 0, 240, 320))
    assert got is not None
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert not _arena_bytes(arena).any()


async def test_a_size_other_than_the_header_said_is_sent_back_not_written(
    pool: DecodePool, arena
) -> None:
    data = shapes_image(320, 240)
    into = Into(ArenaRef.of(arena), 0, 100, 100)  # a block too small for the image
    got = await _decode(pool, data, into)
    assert got is not None and got.shape == (240, 320, 3)
    assert not _arena_bytes(arena).any()


async def test_an_image_that_cannot_be_decoded_writes_nothing(pool: DecodePool, arena) -> None:
    into = Into(ArenaRef.of(arena), 0, 240, 320)
    with pytest.raises(InvalidImageError) as raised:
        await _decode(pool, shapes_image(320, 240)[:400], into, index=2)
    assert raised.value.image_index == 2
    assert not _arena_bytes(arena).any()
