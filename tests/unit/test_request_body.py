"""Compressed request bodies (app/api/http/request_body.py `inflate`, used by the v2 infer
routes): inflated under a size and a ratio cap, refused with a clear error otherwise."""

from __future__ import annotations

import gzip
import zlib

import pytest

from app.api.http.request_body import inflate
from app.errors import InvalidRequestError, PayloadTooLargeError
from tests.unit.kserve_bodies import triton_body


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_inflated(encoding: str) -> None:
    body, _ = triton_body([b"x"])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert inflate(packed, encoding, max_bytes=10_000, max_ratio=20) == body


@pytest.mark.parametrize(
    ("size", "max_bytes", "ratio", "text"),
    [
        (3_000_000, 2_000_000, 1000.0, "inflates past the limit of 2000000 bytes"),
        (3_000_000, 16_000_000, 20.0, "more than 20 times its"),
        (1_048_577, 16_000_000, 1.0, "over the limit of the inflation ratio"),
    ],
    ids=["size-cap", "ratio-cap", "ratio-floor"],
)
def test_compressed_body_inflating_past_a_limit_is_a_413(
    size: int, max_bytes: int, ratio: float, text: str
) -> None:
    bomb = gzip.compress(b"\x00" * size)
    with pytest.raises(PayloadTooLargeError, match=text):
        inflate(bomb, "gzip", max_bytes=max_bytes, max_ratio=ratio)


def test_a_body_just_under_the_ratio_floor_inflates() -> None:
    body = b"\x00" * (1 << 20)
    assert inflate(gzip.compress(body), "gzip", max_bytes=1 << 24, max_ratio=1.0) == body


@pytest.mark.parametrize(
    ("body", "encoding", "text"),
    [
        (b"not gzip", "gzip", "the gzip body cannot be decompressed"),
        (gzip.compress(b"x" * 100)[:-12], "gzip", "the gzip body is truncated"),
        (b"x", "br", "unsupported Content-Encoding 'br'"),
        (b"x", "gzip, gzip", "unsupported Content-Encoding 'gzip, gzip'"),
        (gzip.compress(b"x") * 2, "gzip", "bytes after its end"),
    ],
    ids=["garbage", "truncated", "brotli", "stacked", "concatenated"],
)
def test_bad_compressed_bodies_are_refused(body: bytes, encoding: str, text: str) -> None:
    with pytest.raises(InvalidRequestError, match=text):
        inflate(body, encoding, max_bytes=10_000, max_ratio=20)
