"""A cheap walk of an image's container (JPEG markers, PNG chunks, GIF blocks, WebP chunks)
before Pillow parses it: files whose structure no real image has are refused here.

Decode time grows with structure Pillow and libjpeg walk one by one, not with pixels: a
progressive JPEG of 865 KB holding thousands of empty scans takes libjpeg half a minute (each
scan passes over every block of the image), a PNG of millions of tiny chunks or a GIF of
millions of one-byte sub-blocks keeps Pillow's Python parser busy for seconds. Each walk
stops at its limit, so it costs at most a few thousand steps whatever the file holds.
Pillow has no such limits (libjpeg-turbo's -maxscans is a djpeg flag only): written by hand.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

# Limits that no camera, phone or encoder output reaches: progressive JPEGs hold about 10
# scans (libjpeg's default script; mozjpeg writes up to 20), a JPEG a few dozen segments.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 1000
# libpng writes 8 KB IDAT chunks (a 32 MB file: 4,000 chunks); text and APNG frame chunks
# count too.
MAX_PNG_CHUNKS = 20_000
# Extension sub-blocks (comments, XMP, application data) before a GIF's first frame.
MAX_GIF_BLOCKS_BEFORE_FRAME = 10_000
# Frames of an animated WebP: libwebp's demuxer indexes every frame at open (only the first
# is decoded here).
MAX_WEBP_FRAMES = 10_000

# In entropy-coded JPEG data a marker is 0xFF followed by anything but 0x00 (a stuffed byte),
# 0xD0-0xD7 (restart markers) or 0xFF (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def has_image_signature(data: bytes) -> bool:
    """Whether the bytes start like a file of a format the server decodes (magic bytes only)."""
    return data.startswith(
        (b"\xff\xd8\xff", _PNG_SIGNATURE, b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
    ) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP")


def structure_problem(data: bytes) -> str | None:
    """What is wrong with the file's structure, or None. A file whose structure cannot be
    walked (truncated, not one of these formats) gives None: the decoder says what is wrong."""
    if data.startswith(b"\xff\xd8"):
        return walk_jpeg(data)[0]
    if data.startswith(_PNG_SIGNATURE):
        return _png_problem(data)
    if data.startswith((b"GIF87a", b"GIF89a")):
        return _gif_problem(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_problem(data)
    return None


def walk_jpeg(data: bytes) -> tuple[str | None, int | None]:
    """(problem, end) of a JPEG: `problem` as structure_problem says it; `end` the offset just
    past its end-of-image marker when the walk reached it through well-formed segments, else
    None (truncated, or a structure only the decoder can judge).

    The GPU path hands nvjpeg only JPEGs with an `end`: nvjpeg decodes a truncated file that
    libjpeg (Pillow, the CPU path) refuses, so without the end marker Pillow decides."""
    scans = segments = 0
    pos, end = 2, len(data)
    while pos + 2 <= end:
        if data[pos] != 0xFF:
            return None, None  # not a marker where one must be: the decoder will say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _JPEG_EOI:
            return None, pos + 2
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return (
                f"the JPEG holds more than {MAX_JPEG_SEGMENTS} marker segments; real images "
                "hold a few dozen"
            ), None
        if pos + 4 > end:
            return None, None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            return None, None  # a segment longer than the file, or malformed
        pos += 2 + length
        if marker == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return (
                    f"the JPEG holds more than {MAX_JPEG_SCANS} scans; progressive camera "
                    "images hold about 10"
                ), None
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return None, None  # the scan runs to the end of the file: truncated
            pos = found.start()
    return None, None


# Start-of-frame markers: the frame header that gives a JPEG's size and components.
_JPEG_SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
)
_APP_PREFIX = 16


class JpegHeader(NamedTuple):
    """What a JPEG's segments before its first scan say (see jpeg_header)."""

    precision: int
    height: int
    width: int
    components: int
    markers: frozenset[int]  # every segment's marker byte (0xC0 for SOF0, 0xDB for DQT...)
    apps: tuple[tuple[int, bytes], ...]  # APPn segments: (marker byte, their first bytes)


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header (size, components) of a JPEG and the segments before its first scan,
    read from their markers and lengths alone. None when those segments are not plainly well
    formed (junk between segments, a segment past the end, no frame header or more than one,
    no scan): a full parser judges those. Reads the headers only, never the entropy-coded data."""
    pos, end = 2, len(data)
    frame: tuple[int, int, int, int] | None = None
    markers: set[int] = set()
    apps: list[tuple[int, bytes]] = []
    segments = 0
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE or marker == _JPEG_EOI:
            return None  # not where a header has them
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == _JPEG_SOS:
            if frame is None:
                return None
            return JpegHeader(*frame, frozenset(markers), tuple(apps))
        markers.add(marker)
        if marker in _JPEG_SOF:
            if frame is not None or length < 8:
                return None
            height, width = struct.unpack_from(">HH", data, pos + 5)
            frame = (data[pos + 4], height, width, data[pos + 9])
        elif 0xE0 <= marker <= 0xEF:
            apps.append((marker, data[pos + 4 : pos + 2 + min(length, _APP_PREFIX)]))
        pos += 2 + length
    return None


def _png_problem(data: bytes) -> str | None:
    pos, end, chunks = len(_PNG_SIGNATURE), len(data), 0
    while pos + 8 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            return f"the PNG holds more than {MAX_PNG_CHUNKS} chunks"
        if kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _gif_problem(data: bytes) -> str | None:
    if len(data) < 13:
        return None
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = 0
    while pos < len(data):
        introducer = data[pos]
        if introducer != 0x21:  # an image descriptor, the trailer, or garbage
            return None
        pos += 2  # introducer and label
        while pos < len(data):
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
            blocks += 1
            if blocks > MAX_GIF_BLOCKS_BEFORE_FRAME:
                return (
                    f"the GIF holds more than {MAX_GIF_BLOCKS_BEFORE_FRAME} extension blocks "
                    "before its first frame"
                )
    return None


def _webp_problem(data: bytes) -> str | None:
    pos, end, frames = 12, len(data), 0
    while pos + 8 <= end:
        kind = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if kind == b"ANMF":
            frames += 1
            if frames > MAX_WEBP_FRAMES:
                return f"the WebP holds more than {MAX_WEBP_FRAMES} frames"
        pos += 8 + size + (size & 1)
    return None
