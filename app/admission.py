"""Admission by decoded pixels: a server-wide budget of the pixels that requests hold at once
(being decoded, waiting in the queue, in a batch), granted first come, first served.

A request reserves what its images will hold (from their headers) before any is decoded, gives
back the difference as each image is reduced to the model's input size, and the rest when it is
answered. A request that does not fit waits briefly for room, then is refused (429): memory is
bounded by pixels, not by a count of images that may each be 40 megapixels.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


class BudgetExhaustedError(Exception):
    """The budget had no room for the request within the time it could wait."""

    def __init__(self, wanted: int, held: int, capacity: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server holds {held} decoded pixels of its budget of {capacity}; this "
            f"request needs {wanted}: retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


@dataclass
class Lease:
    """The pixels one request holds; `release` gives part back early."""

    budget: PixelBudget
    pixels: int

    def release(self, pixels: int) -> None:
        pixels = min(max(pixels, 0), self.pixels)
        self.pixels -= pixels
        self.budget._give_back(pixels)


class PixelBudget:
    """At most `capacity` pixels held at once. Event-loop only (no locks): every call comes from
    the loop that serves the requests."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int, max_wait_s: float) -> AsyncIterator[Lease]:
        """Reserve `pixels` for the block (waiting at most `max_wait_s` for room, behind anyone
        already waiting); BudgetExhaustedError when no room came."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        await self._acquire(pixels, max_wait_s)
        lease = Lease(self, pixels)
        try:
            yield lease
        finally:
            lease.release(lease.pixels)

    async def _acquire(self, pixels: int, max_wait_s: float) -> None:
        if not self._waiters and self.held + pixels <= self.capacity:
            self.held += pixels
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=max(max_wait_s, 0.0))
        except BaseException as exc:
            granted = waiter.done() and not waiter.cancelled()
            if granted and isinstance(exc, TimeoutError):
                return  # room came as the wait ended: keep it
            if granted:
                self._give_back(pixels)
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self._wake()  # those behind may fit now
            if isinstance(exc, TimeoutError):
                raise BudgetExhaustedError(
                    pixels, self.held, self.capacity, max(1, math.ceil(max_wait_s))
                ) from None
            raise

    def _give_back(self, pixels: int) -> None:
        self.held -= pixels
        self._wake()

    def _wake(self) -> None:
        # First come, first served: a large request at the head is not overtaken by small ones.
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if self.held + pixels > self.capacity:
                return
            self._waiters.popleft()
            self.held += pixels
            waiter.set_result(None)
