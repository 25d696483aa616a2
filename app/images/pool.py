"""Pillow decodes in worker processes: a decode never holds the server's GIL (so /healthz and
the event loop keep answering), and one that runs past its time is stopped by ending its process.

Why processes rather than threads: libjpeg, libpng and libwebp cannot be interrupted from
Python, and some of Pillow's copies hold the GIL; a thread that runs away can only be waited
for. A worker is killed when its decode passes `timeout_s` or its request is cancelled (the
client hung up, the request failed), and replaced. pebble's ProcessPool does the killing and
replacing (concurrent.futures' pool cannot stop one running task). Workers are spawned, not
forked, so that they never inherit the server's threads or the model; they import only
Pillow, numpy and app.images.decode.

A full-size decode (a tiled image: 8-36 MB of pixels) is written by the worker straight into
the block of the front end's shared-memory arena that the engine will read (`into`), instead of
being pickled back through pebble's pipe, unpickled and copied into the arena by the front
end: one copy, in the worker, and none in the front end.
"""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pebble import ProcessExpired, ProcessPool

from app.errors import ApiError, DeadlineError, ImageTooLargeError, InvalidImageError
from app.images.decode import Fit, decode_image
from app.ipc.wire import ArenaRef, open_arena_ref

if TYPE_CHECKING:
    from app.images.render import Boxes


@dataclass(frozen=True)
class FixedTarget:
    """An image's model input size, computed in the server (the model's resize rules stay
    there) and sent to the worker: picklable, and it imports nothing."""

    height: int
    width: int

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class Into:
    """Where a worker writes the decoded pixels: `offset` in the arena `arena`, as uint8
    [height, width, 3] (the size the header promised)."""

    arena: ArenaRef
    offset: int
    height: int
    width: int


# The answer of a decode written into the arena: nothing else crosses back.
PLACED = "placed"
# How long a block given as `into` may still be written after its decode failed or was
# cancelled: pebble stops a cancelled task's worker from its manager thread, which looks every
# 0.1 s, with SIGTERM, then SIGKILL 3 s later (pebble's CONSTS.sleep_unit, term_timeout).
QUARANTINE_S = 10.0

# Errors cross the process boundary as (kind, message, index): exceptions with keyword-only
# arguments do not survive pickling.
_ERRORS: dict[str, type[ApiError]] = {
    "invalid": InvalidImageError,
    "too_large": ImageTooLargeError,
}
_Result = np.ndarray | str | tuple[str, str, int | None]

# A worker's mappings of the front end's arenas (one per engine connection; a reconnection
# makes a new one), the newest last.
_MAPPED: dict[ArenaRef, mmap.mmap] = {}
_MAPPED_KEEP = 4


def _decode_in_worker(
    data: bytes,
    max_pixels: int,
    index: int,
    target: tuple[int, int] | None,
    resample: int,
    into: Into | None = None,
) -> _Result:
    # The server chose the target (Fit.target): reduce whatever the size.
    fit = Fit(FixedTarget(*target), resample, 0) if target is not None else None
    try:
        pixels = decode_image(data, max_pixels=max_pixels, index=index, fit=fit).pixels
    except ImageTooLargeError as exc:
        return ("too_large", _unprefixed(exc), exc.image_index)
    except InvalidImageError as exc:
        return ("invalid", _unprefixed(exc), exc.image_index)
    if into is None or pixels.shape != (into.height, into.width, 3):
        return pixels
    try:
        arena = _arena(into.arena)
    except OSError:
        return pixels  # the front end copies them, as without `into`
    view = np.ndarray(pixels.shape, dtype=np.uint8, buffer=arena, offset=into.offset)
    np.copyto(view, pixels)
    return PLACED


def _arena(ref: ArenaRef) -> mmap.mmap:
    mapped = _MAPPED.get(ref)
    if mapped is None:
        mapped = _MAPPED[ref] = open_arena_ref(ref)
        while len(_MAPPED) > _MAPPED_KEEP:
            _MAPPED.pop(next(iter(_MAPPED))).close()
    return mapped


def _render_in_worker(
    data: bytes, found: Boxes, max_pixels: int, index: int, fmt: str, labels: bool
) -> bytes | tuple[str, str, int | None]:
    # Imported here: only workers that render load the drawing code and its font.
    from app.images.render import render

    try:
        return render(data, found, max_pixels=max_pixels, index=index, fmt=fmt, labels=labels)
    except ImageTooLargeError as exc:
        return ("too_large", _unprefixed(exc), exc.image_index)
    except InvalidImageError as exc:
        return ("invalid", _unprefixed(exc), exc.image_index)


def _unprefixed(exc: ApiError) -> str:
    return exc.message.removeprefix(f"image {exc.image_index}: ")


def _warm() -> None:
    return None


def _lower_priority() -> None:
    # Decoding is bulk work: when the cores are busy, the event loop (health checks, other
    # requests' parsing) and the model's threads get them first.
    os.nice(10)


class DecodePool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = ProcessPool(
            max_workers=workers,
            initializer=_lower_priority,
            context=multiprocessing.get_context("spawn"),
        )
        # Start the workers now (in the background) rather than on the first request.
        self._warming = [self._pool.schedule(_warm) for _ in range(workers)]

    def wait_started(self, timeout_s: float = 120) -> None:
        """Block until the workers have started (imported Pillow and numpy)."""
        for future in self._warming:
            future.result(timeout=timeout_s)

    async def decode(
        self,
        data: bytes,
        *,
        max_pixels: int,
        index: int,
        target: tuple[int, int] | None,
        resample: int,
        timeout_s: float,
        into: Into | None = None,
    ) -> np.ndarray | None:
        """The decoded pixels (at `target` size when given), or None when the worker wrote
        them at `into` (when it cannot, they come back as without it); InvalidImageError or
        ImageTooLargeError as decode_image raises them; DeadlineError past `timeout_s`.

        With `into`, the block may be written until the worker has stopped: after an error
        or a cancellation the caller keeps it for QUARANTINE_S before reusing it."""
        result = await self._run(
            "decoding",
            _decode_in_worker,
            (data, max_pixels, index, target, resample, into),
            index,
            timeout_s,
        )
        if isinstance(result, str):  # PLACED
            return None
        assert isinstance(result, np.ndarray)
        return result

    async def render(
        self,
        data: bytes,
        found: Boxes,
        *,
        max_pixels: int,
        index: int,
        fmt: str,
        labels: bool,
        timeout_s: float,
    ) -> bytes:
        """The image at full size with `found` drawn on it, encoded as `fmt` (app/images/render.py);
        the decode's errors, and DeadlineError past `timeout_s`."""
        result = await self._run(
            "drawing",
            _render_in_worker,
            (data, found, max_pixels, index, fmt, labels),
            index,
            timeout_s,
        )
        assert isinstance(result, bytes)
        return result

    async def _run(
        self, what: str, function: Any, args: tuple[Any, ...], index: int, timeout_s: float
    ) -> Any:
        future = self._pool.schedule(function, args=args, timeout=max(timeout_s, 0.001))
        try:
            # Cancelling the awaiting task cancels the future: pebble ends the worker.
            result = await asyncio.wrap_future(future)
        except TimeoutError:
            raise DeadlineError(
                f"{what} took longer than {timeout_s:.1f} s and was stopped", image_index=index
            ) from None
        except ProcessExpired:
            raise InvalidImageError(
                f"{what} failed on this image (its worker process died)", image_index=index
            ) from None
        if isinstance(result, tuple):
            kind, message, at = result
            raise _ERRORS[kind](message, image_index=at)
        return result

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)
