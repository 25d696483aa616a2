"""Turning a request body into Python values with bounded work: inflating a compressed body
under a hard cap, and parsing JSON only once a cheap count says it is small enough.

Nothing here imports the web framework; the routes call these and map the errors to statuses.
A client can make the server spend time in three places, each bounded here: inflation (output
cap, ratio cap, on a worker thread, where zlib releases the GIL), counting (one pass over the
bytes in slices, on a worker thread for large bodies) and parsing (only bodies under the value
limit reach json.loads, so a parse costs milliseconds even though it holds the GIL).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from anyio import to_thread

from app.errors import InvalidRequestError, PayloadTooLargeError

T = TypeVar("T")

# Bodies larger than this are counted and parsed on a worker thread.
LARGE_BODY_BYTES = 1 << 20
# A JSON body holds at most this many values, counted as commas (inside strings too, so the
# count is an upper bound on the values a parse would build). A real request needs a few
# dozen: 16 images plus options; 1,000 class names would be the most. Parsing this many
# small values takes under 3 ms of CPU (20,000 integers: 2.6 ms, best of 30 on a 2-core
# machine, 2026-12-02; short strings parse ten times faster).
MAX_JSON_VALUES = 20_000
# Integers in a request are counts and sizes (uint64 at most: 20 digits). Python refuses to
# convert more than 4,300 digits, and converting thousands costs quadratic time.
MAX_INT_DIGITS = 20
# Inflated output always allowed, whatever the ratio: small JSON compresses very well.
INFLATE_RATIO_FLOOR_BYTES = 1 << 20
_COUNT_SLICE = 1 << 20


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    """The body from its chunks (starlette's request.stream()), joined on a worker thread when
    large: bytes.join releases the GIL from 1 MiB on, and writing 32 MB of fresh memory costs
    the event loop 50-120 ms on a busy machine (starlette's request.body() joins on the loop)."""
    parts = [chunk async for chunk in chunks]
    if sum(len(p) for p in parts) <= LARGE_BODY_BYTES:
        return b"".join(parts)
    return await to_thread.run_sync(b"".join, parts)


async def run_sized(size: int, call: Callable[[], T]) -> T:
    """`call()` inline when the body is small, on a worker thread when it is large."""
    if size <= LARGE_BODY_BYTES:
        return call()
    return await to_thread.run_sync(call)


def inflate(
    body: bytes | bytearray, encoding: str | None, *, max_bytes: int, max_ratio: float
) -> bytes | bytearray:
    """Undo a request's Content-Encoding (gzip or deflate, one layer), stopping as soon as the
    output passes `max_bytes` or `max_ratio` times the compressed size (413)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequestError(
            f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none"
        )
    by_ratio = max(INFLATE_RATIO_FLOOR_BYTES, int(max_ratio * len(body)))
    allowed = min(max_bytes, by_ratio)
    # wbits: 16 + MAX_WBITS reads a gzip wrapper, MAX_WBITS a zlib one ("deflate" in HTTP).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        # max_length: zlib stops writing there, so a bomb never takes more than the cap.
        out = inflater.decompress(body, allowed + 1)
    except zlib.error as exc:
        raise InvalidRequestError(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > allowed:
        if allowed < max_bytes:
            raise PayloadTooLargeError(
                f"the {encoding} request body inflates to more than {max_ratio:g} times its "
                f"{len(body)} bytes, over the limit of the inflation ratio (max_inflation_ratio)"
            )
        raise PayloadTooLargeError(
            f"the {encoding} request body inflates past the limit of {max_bytes} bytes "
            "(max_inflated_bytes)"
        )
    if not inflater.eof:
        raise InvalidRequestError(f"the {encoding} body is truncated")
    if inflater.unused_data:
        raise InvalidRequestError(
            f"the {encoding} body has {len(inflater.unused_data)} bytes after its end "
            "(stacked encodings are not accepted)"
        )
    return out


def check_value_count(body: bytes | bytearray, what: str, limit: int = MAX_JSON_VALUES) -> None:
    """413 when `body` could hold more than `limit` JSON values, before any parsing."""
    commas = 0
    # In slices, so that a worker thread running this lets the event loop in between.
    for start in range(0, len(body), _COUNT_SLICE):
        commas += body.count(b",", start, start + _COUNT_SLICE)
        if commas > limit:
            raise PayloadTooLargeError(
                f"{what} holds more than {limit} JSON values, over the limit of {limit}"
            )


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _IntTooLong(digits)
    return int(text)


class _IntTooLong(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def loads(text: str | bytes | bytearray, what: str) -> Any:
    """json.loads with 400s that name the problem for what Python refuses: too deep a nesting,
    too long an integer, invalid JSON. Callers check the value count first.

    orjson parses first (a third of json.loads' time on a request's body, and no decoder object
    per call); json.loads gives the value, or the message, whenever orjson refuses the text (NaN,
    lone surrogates, a BOM, UTF-16, nesting past 1024), read an integer out of the 64-bit range
    as a float (json.loads keeps it an integer, or refuses it by MAX_INT_DIGITS), or accepted a
    nesting deep enough for json.loads to refuse: the values accepted and the errors are
    json.loads' own."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    else:
        try:
            plain = not _needs_stdlib(value)
        except RecursionError:  # a deep stack already: json.loads decides
            plain = False
        if plain:
            return value
    try:
        return json.loads(text, parse_int=_bounded_int)
    except _IntTooLong as exc:
        raise InvalidRequestError(
            f"{what} holds an integer of {exc.digits} digits; integers have at most "
            f"{MAX_INT_DIGITS} digits"
        ) from None
    except RecursionError:
        raise InvalidRequestError(f"{what} nests arrays or objects too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid JSON: {exc.msg} at byte {exc.pos}"
        ) from None
    except UnicodeDecodeError:
        raise InvalidRequestError(f"{what} is not valid UTF-8") from None


def _needs_stdlib(value: Any, depth: int = 0) -> bool:
    """Whether json.loads must decide about a value orjson parsed: it holds a float at or past
    2**63 (what orjson makes of an integer outside the 64-bit range), or nests deeper than
    _DEEP (where json.loads meets Python's recursion limit, and orjson goes on to 1024)."""
    kind = type(value)
    if kind is float:
        return bool(abs(value) >= _HUGE)
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:  # str, int, bool, None
        return False
    if depth >= _DEEP:
        return True
    for child in children:  # a loop, not any(): one frame per level
        if _needs_stdlib(child, depth + 1):
            return True
    return False


_HUGE = float(2**63)
_DEEP = 500


def parse_json(body: bytes | bytearray, what: str, limit: int = MAX_JSON_VALUES) -> Any:
    """Count, then parse (see the module docstring): the JSON value of `body`."""
    check_value_count(body, what, limit)
    return loads(body, what)


def parse_count(text: str | None, name: str) -> int | None:
    """A byte count from a header: ASCII digits only (str.isdigit also says yes to '²' and
    '٣', which int() then refuses or reads), at most 20 of them."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_INT_DIGITS:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidRequestError(f"{name} must be a byte count, got {shown!r}")
    return int(text)
