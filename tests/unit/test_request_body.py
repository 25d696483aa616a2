"""app/api/http/request_body.py: `loads` parses with orjson where it can (the values it accepts
and the errors it gives stay json.loads' own, with the integer digit limit); `inflate` (the v2
infer routes' compressed bodies) inflates under a size and a ratio cap, refused with a clear
error otherwise."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from app.api.http.request_body import MAX_INT_DIGITS, _bounded_int, inflate, loads
from app.errors import InvalidRequestError, PayloadTooLargeError
from tests.unit.kserve_bodies import triton_body

CASES = [
    b'{"images": [{"data": "aGVsbG8="}], "threshold": 0.25, "max_detections": 7}',
    b'{"a": 1, "a": 2}',
    b"[1e400, -1e400, 1.5e-400, -0, 0.1]",
    b"18446744073709551615",
    b"18446744073709551616",  # past uint64: orjson reads a float, json.loads an int
    b"-9223372036854775809",  # below int64
    b'{"classes": [-99999999999999999999]}',
    b"[NaN, Infinity, -Infinity]",  # refused by orjson, accepted by json.loads
    b'"\\ud800"',  # a lone surrogate
    "\ufeff{}".encode(),  # a byte-order mark
    '{"x": 1}'.encode("utf-16"),
    b"[" * 400 + b"]" * 400,
    b"[" * 1000 + b"]" * 1000,  # json.loads decides (it refuses this deep here, under pytest)
    b"1e20",
    "[1, 2]",  # text, as the v2 codec passes it
]


def outcome(call: object, text: str | bytes) -> str:
    """The value's repr (the same types too: an int stays an int; NaN compares by its
    spelling), or that it was refused."""
    try:
        return repr(call(text))  # type: ignore[operator]
    except (ValueError, RecursionError, InvalidRequestError):
        return "refused"


@pytest.mark.parametrize("text", CASES, ids=range(len(CASES)))
def test_loads_gives_json_loads_values(text: bytes) -> None:
    expected = outcome(lambda t: json.loads(t, parse_int=_bounded_int), text)
    assert outcome(lambda t: loads(t, "the body"), text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"1" * (MAX_INT_DIGITS + 1), f"an integer of {MAX_INT_DIGITS + 1} digits"),
        (b'{"n": -' + b"9" * 30 + b"}", "an integer of 30 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deeply"),
        (b'{"a": }', "is not valid JSON: Expecting value at byte 6"),
        (b"\xff\xfe\xfa", "not valid"),
    ],
)
def test_loads_refuses_as_before(text: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match="the body") as exc:
        loads(text, "the body")
    assert message in str(exc.value)


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
