"""request_body.loads parses with orjson where it can: the values it accepts and the errors it
gives must stay json.loads' own (with the integer digit limit)."""

from __future__ import annotations

import json

import pytest

from app.api.http.request_body import MAX_INT_DIGITS, _bounded_int, loads
from app.errors import InvalidRequestError

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
