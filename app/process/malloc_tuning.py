"""glibc malloc settings for the server's processes (Linux with glibc; nothing elsewhere).

Measured with the soak test (scripts/bench/loadtest.py):
- one malloc arena per allocating thread grows the heap by fragmentation (RSS +38% in 3 minutes
  at 2x load; +12% with 2 arenas);
- in a front-end worker, large request bodies (tens of MB of JSON) freed back to the heap stay
  resident: glibc's dynamic mmap threshold rises after the first large free, so later large
  buffers come from the heap and are not returned (front end 78 -> 211 MB after 32 dense 31 MB
  bodies; 79 MB with a fixed 128 KiB threshold).
An environment variable of glibc's own (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) wins.
"""

from __future__ import annotations

import os
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_M_ARENA_MAX = -8


def _mallopt(param: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):
        pass  # not glibc (e.g. musl): nothing to tune


def cap_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas in this process and in every process it starts (the
    engine and front-end processes are spawned: they read the variable when they start)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    _mallopt(_M_ARENA_MAX, arenas)


def return_large_frees(threshold_bytes: int = 128 * 1024) -> None:
    """Allocations over `threshold_bytes` are mapped and unmapped on their own, so a freed
    request body goes back to the system. For the front ends only: in the engine, torch's
    tensors would be mapped and faulted in again on every forward pass."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
