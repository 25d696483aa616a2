"""Control channel framing and the shared-memory arena.

Why a unix stream socket with length-prefixed pickles, and not pipes, multiprocessing queues
or ZeroMQ: both ends already run an asyncio loop (uvicorn's, and the batcher's in the engine),
and asyncio speaks unix sockets natively, so a message costs one write and one read with no
helper thread (multiprocessing queues add a feeder thread and a lock per put; pyzmq would be a
dependency for what a 4-byte length prefix does). A socket also tells every front end at once
when the engine dies (EOF), which is how held requests fail fast instead of hanging, and a
restarted engine is reached again at the same path. Messages are small (ids, options, offsets,
at most a few hundred detections); pixels never go through pickle on the normal path.
"""

from __future__ import annotations

import _posixshmem
import asyncio
import bisect
import collections
import logging
import mmap
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, cast

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
MAX_MESSAGE = 1 << 31  # an image that did not fit in the arena travels inline: allow big ones


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message; raises asyncio.IncompleteReadError when the peer has gone."""
    (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length > MAX_MESSAGE:
        raise ConnectionError(f"message of {length} bytes: the peer is not a detr-serve process")
    return pickle.loads(await reader.readexactly(length))


def pack_message(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def write_message(writer: asyncio.StreamWriter, message: Any) -> None:
    """Queue a message (the caller awaits writer.drain() where it wants backpressure)."""
    writer.write(pack_message(message))


class Channel(asyncio.Protocol):
    """One framed-message connection on the event loop, both ways, with no task or future per
    message: the messages that arrive are unpickled in data_received and handed, in order, to
    `on_message` (until it is set, they wait for next_message()); the messages sent in one turn
    of the loop leave in one write at its end (send()), so a batch's answers, or the requests a
    front end read in one turn, cost one system call and wake the peer once. Replaces asyncio's
    StreamReader/StreamWriter on the hot path (a future, a task wake-up and a readexactly per
    message read; a write per message sent)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_message: Callable[[Any], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._inbox: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None  # next_message() waiting
        self._paused: asyncio.Future[None] | None = None  # the peer is not reading
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, size = 0, len(buffer)
        try:
            while size - pos >= _HEADER.size:
                (length,) = _HEADER.unpack_from(buffer, pos)
                if length > MAX_MESSAGE:
                    raise ConnectionError(
                        f"message of {length} bytes: the peer is not a detr-serve process"
                    )
                end = pos + _HEADER.size + length
                if end > size:
                    break
                with memoryview(buffer) as view, view[pos + _HEADER.size : end] as payload:
                    message = pickle.loads(payload)
                pos = end
                self._deliver(message)
        except Exception:
            logger.exception("bad message on an engine connection: closing it")
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        for waiter in (self._waiter, self._paused):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None:
            self._paused = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    # -- use ----------------------------------------------------------------------------------
    def _deliver(self, message: Any) -> None:
        if self.on_message is not None and not self._inbox:
            self.on_message(message)
            return
        self._inbox.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_message(self) -> Any:
        """The next message, for a caller that has not set on_message (a handshake); raises
        ConnectionError when the connection ends first."""
        while not self._inbox:
            if self.closed.done():
                raise ConnectionError("the peer closed the connection")
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._inbox.popleft()

    def listen(self, on_message: Callable[[Any], None]) -> None:
        """Hand every message from now on to `on_message`, those waiting first."""
        self.on_message = on_message
        while self._inbox:
            on_message(self._inbox.popleft())

    def send(self, message: Any) -> None:
        """Queue a message; the messages of this turn of the loop are written at its end. A
        message to a connection that has ended is dropped (its requests fail on the EOF)."""
        if self.transport is None or self.transport.is_closing():
            return
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._out += (_HEADER.pack(len(payload)), payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    async def drained(self) -> None:
        """Returns at once unless the peer has stopped reading (the socket's buffer is full),
        then once it reads again or the connection has ended."""
        if self._paused is not None:
            await self._paused

    def close(self) -> None:
        """Close after what is queued has been written."""
        self.flush()
        if self.transport is not None:
            self.transport.close()


def call_blocking(path: str, message: Any, timeout_s: float) -> Any:
    """Send one message over a new connection to `path` and read one answer (no event loop:
    the supervisor's threads). Raises OSError when nothing listens or answers in time."""
    import socket

    def exactly(sock: socket.socket, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = sock.recv(n - len(chunks))
            if not chunk:
                raise ConnectionError("the peer closed the connection")
            chunks += chunk
        return bytes(chunks)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(pack_message(message))
        (length,) = _HEADER.unpack(exactly(sock, _HEADER.size))
        if length > MAX_MESSAGE:
            raise ConnectionError(
                f"message of {length} bytes: the peer is not a detr-serve process"
            )
        return pickle.loads(exactly(sock, length))


class ArenaAllocator:
    """First-fit allocation of byte ranges in one arena, with neighbours merged on release.

    Written by hand: the standard library has no allocator for an external buffer. Used from
    the front end's event loop only (no lock). Blocks are aligned to 64 bytes (a cache line).
    """

    ALIGN = 64

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self.used = 0

    @classmethod
    def rounded(cls, nbytes: int) -> int:
        return max(cls.ALIGN, (nbytes + cls.ALIGN - 1) // cls.ALIGN * cls.ALIGN)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a block of at least `nbytes`, or None when no free range is large enough."""
        need = self.rounded(nbytes)
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, length - need)
                self.used += need
                return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        length = self.rounded(nbytes)
        self.used -= length
        i = bisect.bisect_left(self._free, (offset, 0))
        # Merge with the following and the preceding free range where they touch.
        if i < len(self._free) and offset + length == self._free[i][0]:
            length += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, length))

    def reset(self) -> None:
        self._free = [(0, self.size)]
        self.used = 0

    @property
    def free_ranges(self) -> list[tuple[int, int]]:
        return list(self._free)


def create_arena(nbytes: int, *, unlink: bool = False) -> shared_memory.SharedMemory:
    """A new shared-memory segment with its pages reserved now: a /dev/shm too small for it
    (Docker's default is 64 MB) fails here with a message, not later with SIGBUS mid-request.
    `unlink`: remove its name at once (a probe of whether /dev/shm has room)."""
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        os.posix_fallocate(shm._fd, 0, nbytes)  # type: ignore[attr-defined]
    except OSError as exc:
        shm.close()
        shm.unlink()
        raise OSError(
            f"cannot reserve {nbytes >> 20} MB of shared memory in /dev/shm ({exc}): give the "
            "container more (docker run --shm-size=1g; compose shm_size) or lower "
            "--shm-arena-mb"
        ) from exc
    if unlink:
        shm.unlink()
    return shm


def attach_arena(name: str) -> mmap.mmap:
    """Map a front end's arena, for reading pixels in place.

    A bare mmap, on purpose: numpy arrays made on it keep the mmap object alive, and it is
    unmapped only when the last of them is gone. SharedMemory.close() (also called by its
    __del__) would unmap it under a batch still reading it when the front end disconnects,
    a segfault. And SharedMemory would register the segment with the resource tracker on
    Python < 3.13, which unlinks it when this process exits, though the front end owns it.
    """
    fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ArenaRef:
    """Where another process of this front end (a decode worker) finds an arena: through
    /proc/<pid>/fd/<fd> of the front end, which reopens the segment even after its name has
    been unlinked (a tmpfs file lives while a descriptor or mapping holds it). `inode` tells
    the segment apart from whatever a reused descriptor number points to later."""

    pid: int
    fd: int
    inode: int
    size: int

    @classmethod
    def of(cls, shm: shared_memory.SharedMemory) -> ArenaRef:
        fd = shm._fd  # type: ignore[attr-defined]
        return cls(os.getpid(), fd, os.fstat(fd).st_ino, shm.size)


def open_arena_ref(ref: ArenaRef) -> mmap.mmap:
    """Map the arena `ref` names, for writing (a decode worker). OSError when it cannot be
    reached (no /proc, or a process that may not read the front end's descriptors) or is not
    that arena any more (the front end reconnected and the descriptor number was reused)."""
    fd = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDWR)
    try:
        stat = os.fstat(fd)
        if stat.st_ino != ref.inode or stat.st_size != ref.size:
            raise OSError(f"descriptor {ref.fd} of process {ref.pid} is not the arena any more")
        # Page tables filled at once (Linux): a worker writes most of the arena over time, and
        # one fault per 4 KB page on first touch costs more than populating them in a batch.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, ref.size, flags=flags)
    finally:
        os.close(fd)
