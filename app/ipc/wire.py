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
import mmap
import os
import pickle
import struct
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

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
