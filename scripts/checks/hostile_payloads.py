"""Hostile payloads of issue 20 and the hostile origin that serves the URL ones: shared by the
security suite (tests/security/) and the mixed soak (scripts/bench/loadtest.py --hostile).

Each builder is pure and cheap to call twice (the large ones are cached): what a payload is
lives here once, what the server must answer to it lives with each caller.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import brotli
from PIL import Image

_MIB = 1 << 20

# --- compressed downloads (finding 1) -----------------------------------------------------------


def _raw_deflate_zeros(size: int) -> bytes:
    """Raw deflate of `size` zero bytes, built from one compressed MiB: after a full flush the
    compressor starts afresh, so every MiB block compresses to the same bytes."""
    block = bytes(_MIB)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    one = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    return one * (size // _MIB) + comp.flush(zlib.Z_FINISH)


@cache
def gzip_bomb(size: int) -> bytes:
    """A gzip member that inflates to `size` zero bytes (a whole number of MiB)."""
    crc = 0
    block = bytes(_MIB)
    for _ in range(size // _MIB):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFF_FFFF)
    return header + _raw_deflate_zeros(size) + trailer


@cache
def deflate_bomb(size: int) -> bytes:
    # zlib-wrapped, as RFC 9110's "deflate" says; Adler-32 of n zeros is (n mod 65521) << 16 | 1
    adler = ((size % 65521) << 16) | 1
    return b"\x78\x9c" + _raw_deflate_zeros(size) + struct.pack(">I", adler)


@cache
def brotli_bomb(size: int) -> bytes:
    comp = brotli.Compressor(quality=5)
    block = bytes(_MIB)
    parts = [comp.process(block) for _ in range(size // _MIB)]
    return b"".join(parts) + comp.finish()


@cache
def gzip_gzip_bomb(size: int) -> bytes:
    return zlib.compress(gzip_bomb(size), 9, wbits=31)


@cache
def br_gzip_bomb(size: int) -> bytes:
    return brotli.compress(gzip_bomb(size))


# --- pixel floods (finding 2) -------------------------------------------------------------------

WIDTH, HEIGHT = 8000, 5000  # 40 megapixels: exactly the default per-image limit


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _palette() -> Image.Image:
    img = Image.new("P", (WIDTH, HEIGHT), 3)
    img.putpalette([(i * 7) % 256 for i in range(768)])
    return img


def _animated_webp() -> bytes:
    frames = [Image.new("RGB", (WIDTH, HEIGHT), c) for c in ((10, 200, 30), (200, 10, 30))]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


# Lossless 40-megapixel images of a few KB each: one per class the issue names.
PIXEL_FLOODS: dict[str, Callable[[], bytes]] = {
    "1-bit-png": lambda: encode(Image.new("1", (WIDTH, HEIGHT), 1), "PNG"),
    "palette-png": lambda: encode(_palette(), "PNG"),
    "16-bit-png": lambda: encode(Image.new("I;16", (WIDTH, HEIGHT), 40_000), "PNG"),
    "lossless-webp": lambda: encode(
        Image.new("RGB", (WIDTH, HEIGHT), (10, 200, 30)), "WEBP", lossless=True, method=0
    ),
    "animated-webp": _animated_webp,
    "deflate-tiff": lambda: encode(
        Image.new("L", (WIDTH, HEIGHT), 90), "TIFF", compression="tiff_adobe_deflate"
    ),
    "lzw-tiff": lambda: encode(
        Image.new("RGB", (WIDTH, HEIGHT), 9), "TIFF", compression="tiff_lzw"
    ),
}


# --- decode-time bombs (finding 4) --------------------------------------------------------------


def progressive_jpeg(width: int, height: int) -> bytes:
    return encode(
        Image.new("RGB", (width, height), (120, 60, 200)), "JPEG", progressive=True, quality=80
    )


def sos_headers(data: bytes) -> list[bytes]:
    """The start-of-scan segments (marker, length, header) of a JPEG, in order."""
    found, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xDA:
            found.append(data[pos : pos + 2 + length])
            pos += 2 + length
            # skip the entropy-coded data up to the next marker
            while not (data[pos] == 0xFF and data[pos + 1] not in (0, *range(0xD0, 0xD8))):
                pos += 1
            continue
        pos += 2 + length
    return found


def scan_bomb(width: int, height: int, scans: int, which: int) -> bytes:
    """A progressive JPEG with `scans` extra empty scans (one of its own scan headers, repeated
    with no data) before the end: each makes libjpeg pass over every block of the image."""
    data = progressive_jpeg(width, height)
    header = sos_headers(data)[which]
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + header * scans + data[eoi:]


# --- request bodies (findings 3 and 6) ----------------------------------------------------------

HEADER_LENGTH = "Inference-Header-Content-Length"


def binary_request(count: int, shape: list[int] | None = None) -> tuple[bytes, int]:
    """A v2 request with `count` zero-length BYTES elements in the binary section, and the
    length of its JSON header."""
    binary = b"\x00\x00\x00\x00" * count
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": shape or [count],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(binary)},
                }
            ]
        }
    ).encode()
    return head + binary, len(head)


def json_v2(count: int) -> bytes:
    """A v2 JSON request of `count` empty strings in 'data'."""
    return (
        b'{"inputs":[{"name":"images","shape":[%d],"datatype":"BYTES","data":[' % count
        + b",".join([b'""'] * count)
        + b"]}]}"
    )


def gzip_binary_elements(count: int = 8_000_000) -> tuple[bytes, dict[str, str]]:
    """31 KB of gzip that inflates to 32 MB: `count` zero-length binary elements (v2)."""
    body, head_len = binary_request(count)
    return gzip.compress(body, 9), {"Content-Encoding": "gzip", HEADER_LENGTH: str(head_len)}


def url_entries(count: int = 2_600_000) -> bytes:
    """A /v1 body of `count` tiny URL entries (31 MB at the default)."""
    return b'{"images":[' + b",".join([b'{"url":"a"}'] * count) + b"]}"


def deep_nesting(depth: int = 100_000) -> bytes:
    """Arrays nested `depth` deep: past the JSON parser's recursion limit."""
    return b"[" * depth + b"]" * depth


# --- an origin for the URL cases ----------------------------------------------------------------


@dataclass
class Payload:
    body: bytes | Callable[[], Iterator[bytes]]
    headers: dict[str, str]
    status: int = 200


class HostileOrigin:
    """A real HTTP server on 127.0.0.1 that answers each registered path with the bytes (or the
    chunk generator) and the headers it was given, verbatim: no Content-Length unless given,
    Content-Encoding as declared, whatever the body really is."""

    def __init__(self) -> None:
        self.payloads: dict[str, Payload] = {}
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                payload = origin.payloads.get(self.path)
                if payload is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(payload.status)
                for key, value in payload.headers.items():
                    self.send_header(key, value)
                body = payload.body
                chunked = callable(body) and "Content-Length" not in payload.headers
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                elif not callable(body) and "Content-Length" not in payload.headers:
                    self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if callable(body):
                        for chunk in body():
                            if chunked:
                                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            else:
                                self.wfile.write(chunk)
                        if chunked:
                            self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server under test gave up first, as it should

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def serve(
        self,
        path: str,
        body: bytes | Callable[[], Iterator[bytes]],
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> str:
        self.payloads[path] = Payload(body, dict(headers or {}), status)
        return self.base + path

    def close(self) -> None:
        self._server.shutdown()
