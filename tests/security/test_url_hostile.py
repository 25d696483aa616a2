"""Hostile image URLs against the real server, served by a real hostile origin: compression
bombs (gzip, deflate, br, stacked codings), bodies that lie about their coding, endless and
broken bodies, and URLs or redirects that cannot be parsed. Each class alone, eight requests at
once, and one request holding 16 such URLs.

Bounds asserted for every class (the server on its defaults, 32 MiB byte cap per image):
- the answer is a 4xx whose message names the problem (never a 500);
- it arrives within REFUSAL_S alone, CONCURRENT_S when 8 x 16 URLs come at once (a compressed
  response is refused on its headers, before any of its body is read);
- the server's process tree grows by at most RSS_MB while a 4 GiB-inflating body is refused
  (CAPPED_RSS_MB where the server must read up to the byte cap of each URL first);
- /healthz answers within 100 ms throughout (the harness's HEALTH_BOUND_S).
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest

from scripts.checks import hostile_payloads
from tests.security.conftest import assert_refused, concurrently

REFUSAL_S = 3.0
CONCURRENT_S = 10.0
RSS_MB = 100
CAP_BYTES = 32 * 1024 * 1024  # max_upload_bytes on the defaults
# Bodies without a coding are read up to the 32 MiB cap of each URL before they are refused;
# downloaded bodies hold at most max_download_buffer_bytes (128 MiB) together, and the event
# loop and the HTTP stack hold what they have read and not yet handed over, which the buffer
# cannot count (up to about 3 MB per download socket; measured: about 200 MB in all for 8 x 16
# endless bodies).
CAPPED_RSS_MB = 128 + 32 * 3 + RSS_MB
URLS_PER_REQUEST = 16
AT_ONCE = 8

# What each bomb inflates to. 4 GiB as in the report; a smaller size (the env variable, in MiB)
# is for running this suite against a server without the fix on a shared machine.
BOMB_BYTES = int(os.environ.get("DETR_HOSTILE_BOMB_MIB", "4096")) << 20
_MIB = 1 << 20


def gzip_bomb() -> bytes:
    return hostile_payloads.gzip_bomb(BOMB_BYTES)


def deflate_bomb() -> bytes:
    return hostile_payloads.deflate_bomb(BOMB_BYTES)


def brotli_bomb() -> bytes:
    return hostile_payloads.brotli_bomb(BOMB_BYTES)


def gzip_gzip_bomb() -> bytes:
    return hostile_payloads.gzip_gzip_bomb(BOMB_BYTES)


def br_gzip_bomb() -> bytes:
    return hostile_payloads.br_gzip_bomb(BOMB_BYTES)


def _chunks(data: bytes, size: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
    """The body sent chunked, with no Content-Length."""
    return lambda: (data[i : i + size] for i in range(0, len(data), size))


def _zeros(total: int, chunk: int) -> Callable[[], Iterator[bytes]]:
    piece = bytes(chunk)
    return lambda: (piece for _ in range(total // chunk))


# (Content-Encoding as sent, the body, the coding the refusal must name). Bodies alternate
# between a Content-Length and chunked transfer.
COMPRESSED = {
    "br": ("br", brotli_bomb, "br"),
    "gzip": ("gzip", gzip_bomb, "gzip"),
    "gzip-chunked": ("gzip", lambda: _chunks(gzip_bomb()), "gzip"),
    "x-gzip": ("x-gzip", gzip_bomb, "x-gzip"),
    "deflate": ("deflate", deflate_bomb, "deflate"),
    "deflate-chunked": ("deflate", lambda: _chunks(deflate_bomb()), "deflate"),
    "gzip, gzip": ("gzip, gzip", gzip_gzip_bomb, "gzip, gzip"),
    "gzip, br": ("gzip, br", br_gzip_bomb, "gzip, br"),
    "identity, br": ("identity, br", lambda: _chunks(brotli_bomb()), "br"),
    "zstd": ("zstd", gzip_bomb, "zstd"),
}


def _body(make: Callable[[], object]) -> bytes | Callable[[], Iterator[bytes]]:
    body = make()
    assert isinstance(body, bytes) or callable(body)
    return body  # type: ignore[return-value]


def _slug(case: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", case.lower())


# One client for every attack, so that the test process does not build an SSL context per
# request while the watch's /healthz probe shares its interpreter.
_client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=AT_ONCE * 2))


@pytest.fixture(scope="module", autouse=True)
def _quiet_test_process() -> Iterator[None]:
    """The /healthz probe runs on a thread of this process: a full garbage collection here
    (torch and transformers are loaded) holds the GIL for 100-400 ms on a busy machine and
    would read as a slow server. Freezing what exists keeps the collections short."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _detect(server, urls: list[str]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = _client.post(server.url + "/v1/detect", json={"images": [{"url": u} for u in urls]})
    return r, time.monotonic() - started


def _names(*words: str) -> Callable[[httpx.Response], None]:
    def check(r: httpx.Response) -> None:
        assert_refused(r, (400,), *words)

    return check


def _connections_to(server, origin) -> list:
    port = int(origin.base.rsplit(":", 1)[1])
    proc = psutil.Process(server.proc.pid)
    return [c for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == port]


def _assert_no_connection_left(server, origin) -> None:
    """Every refused or cancelled download closed its connection (a leaked one would hold a
    slot of the connection pool, and a hostile origin's thread, for good)."""
    deadline = time.monotonic() + 2.0
    while (left := _connections_to(server, origin)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{len(left)} connections to the origin outlived their downloads"


def _attack_alone_and_at_once(
    server,
    origin,
    watch,
    urls: list[str],
    check: Callable[[httpx.Response], None],
    *,
    rss_mb: float,
) -> None:
    """One URL alone, then one request of 16 URLs, then 8 such requests at once: the server
    within its bounds throughout, and each answer in time and passing `check` (a 4xx naming
    the problem)."""
    batch = [urls[i % len(urls)] for i in range(URLS_PER_REQUEST)]
    for requests, urls_each, bound_s in (
        (1, 1, REFUSAL_S),
        (1, 16, CONCURRENT_S),
        (8, 16, CONCURRENT_S),
    ):
        with watch(server) as report:
            sent = batch[:urls_each]
            answers = concurrently(requests, lambda _, sent=sent: _detect(server, sent))
        for r, took in answers:
            check(r)
            assert took < bound_s, f"the refusal took {took:.1f} s (bound {bound_s} s)"
        report.assert_bounds(rss_growth_mb=rss_mb if urls_each > 1 else RSS_MB)
    _assert_no_connection_left(server, origin)


@pytest.mark.parametrize("case", list(COMPRESSED))
def test_compressed_responses_are_refused_without_inflating(
    hostile_server, hostile_origin, watch, case: str
) -> None:
    coding, make, named = COMPRESSED[case]
    url = hostile_origin.serve(
        f"/compressed/{_slug(case)}.jpg",
        _body(make),
        {"Content-Type": "image/jpeg", "Content-Encoding": coding},
    )
    check = _names("compressed", f"({named})", "uncompressed")
    _attack_alone_and_at_once(hostile_server, hostile_origin, watch, [url], check, rss_mb=RSS_MB)


# Bodies that lie about their coding: what is refused is what the headers declare; a body
# declared identity is taken as it is (a bomb's few kilobytes, which are not an image).
LIES = {
    "gzip declared, plain body": ("gzip", lambda: _zeros(BOMB_BYTES, _MIB), "compressed"),
    "br declared, gzip body": ("br", gzip_bomb, "compressed"),
    "GZIP upper case": ("GZIP", gzip_bomb, "compressed"),
    "identity declared, br body": ("identity", brotli_bomb, "not an image"),
    "nothing declared, gzip body": (None, lambda: _chunks(gzip_bomb()), "not an image"),
    "nothing declared, gzip, gzip body": (None, gzip_gzip_bomb, "not an image"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_bodies_that_lie_about_their_coding_are_not_inflated(
    hostile_server, hostile_origin, watch, case: str
) -> None:
    coding, make, named = LIES[case]
    names = _names(named)

    def check(r: httpx.Response) -> None:
        # Bodies declared uncompressed are downloaded whole (4 MiB each here) and held until
        # decoded: 8 x 16 of them at once pass the download buffer, and those are a 429.
        if r.status_code == 429:
            assert_refused(r, (429,), "downloads in progress", "retry")
        else:
            names(r)

    headers = {"Content-Type": "image/jpeg"}
    if coding is not None:
        headers["Content-Encoding"] = coding
    url = hostile_origin.serve(f"/lies/{_slug(case)}", _body(make), headers)
    _attack_alone_and_at_once(
        hostile_server, hostile_origin, watch, [url], check, rss_mb=CAPPED_RSS_MB
    )


# Identity bodies of 4 GiB, chunked in large or small pieces (no Content-Length), or declaring
# their length: each cut at the byte cap while streaming, or refused from the declared length.
ENDLESS = {
    "chunked 1 MiB pieces": (_zeros(BOMB_BYTES, _MIB), {}),
    "chunked 16 KiB pieces": (_zeros(BOMB_BYTES, 16 * 1024), {}),
    "declared 4 GiB": (_zeros(BOMB_BYTES, 256 * 1024), {"Content-Length": str(BOMB_BYTES)}),
}


def _over_the_cap(r: httpx.Response) -> None:
    """413 for a body over the byte cap; 429 (with Retry-After) for a download refused because
    downloads in progress already hold the server's download buffer."""
    if r.status_code == 429:
        assert_refused(r, (429,), "downloads in progress", "retry")
        assert r.headers.get("retry-after")
    else:
        assert_refused(r, (413,), "over the limit of", str(CAP_BYTES))


@pytest.mark.parametrize("case", list(ENDLESS))
def test_endless_bodies_are_cut_at_the_byte_cap(
    hostile_server, hostile_origin, watch, case: str
) -> None:
    body, headers = ENDLESS[case]
    url = hostile_origin.serve(
        f"/endless/{_slug(case)}", body, {"Content-Type": "image/jpeg", **headers}
    )
    _attack_alone_and_at_once(
        hostile_server, hostile_origin, watch, [url], _over_the_cap, rss_mb=CAPPED_RSS_MB
    )


def _truncated() -> Iterator[bytes]:
    yield b"\xff\xd8\xff\xe0" + bytes(60)


BROKEN = {
    "body shorter than its Content-Length": (
        _truncated,
        {"Content-Length": "100000"},
        "broke off",
    ),
    "transfer coding other than chunked": (
        b"\xff\xd8\xff",
        {"Transfer-Encoding": "gzip, chunked"},
        "valid HTTP",
    ),
    "two different Content-Lengths": (
        _truncated,
        {"Content-Length": "64, 65"},
        "valid HTTP",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bodies_are_a_400_not_a_500(
    hostile_server, hostile_origin, watch, case: str
) -> None:
    body, headers, named = BROKEN[case]
    url = hostile_origin.serve(f"/broken/{_slug(case)}", body, headers)
    _attack_alone_and_at_once(
        hostile_server, hostile_origin, watch, [url], _names(named), rss_mb=RSS_MB
    )


# URLs (given, or reached by a redirect) that cannot be fetched for what they are: each a 400
# that names the problem.
BAD_HOSTS = {
    "invalid IDNA: bad A-label": ("http://xn--zz.example/a.jpg", "cannot be parsed"),
    "invalid IDNA: empty punycode": ("http://xn--.example/a.jpg", "cannot be parsed"),
    "invalid IDNA: snowman": ("http://\u2603.example/a.jpg", "cannot be parsed"),
    "invalid IDNA: joiner": ("http://a\u200db.example/a.jpg", "cannot be parsed"),
    "label of 64": ("http://" + "a" * 64 + ".example/a.jpg", "label of 64 characters"),
    "label of 200": ("http://b." + "a" * 200 + ".example/a.jpg", "label of 200 characters"),
    "host of 300": ("http://" + "a1234567." * 33 + "example/", "over DNS's limit of 253"),
    "empty label": ("http://a..example/a.jpg", "empty label"),
    "percent in host": ("http://exa%20mple.com/a.jpg", "not allowed in a host name"),
}


@pytest.mark.parametrize("case", list(BAD_HOSTS))
def test_invalid_hosts_are_a_400_naming_the_problem(hostile_server, watch, case: str) -> None:
    url, named = BAD_HOSTS[case]
    with watch(hostile_server) as report:
        r, took = _detect(hostile_server, [url])
        body = assert_refused(r, (400,), "image 0", named)
        assert body["error"]["type"] == "invalid_url"
        answers = concurrently(AT_ONCE, lambda _: _detect(hostile_server, [url] * 16))
    assert took < REFUSAL_S
    for r, took in answers:
        assert_refused(r, (400,), named)
        assert took < CONCURRENT_S
    report.assert_bounds(rss_growth_mb=RSS_MB)


REDIRECTS = {
    "data: URL": ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'"),
    "mailto: URL": ("mailto:someone@example.com", "scheme 'mailto'"),
    "javascript: URL": ("javascript:alert(1)", "scheme 'javascript'"),
    "file: URL": ("file:///etc/passwd", "scheme 'file'"),
    "http URL without a host": ("https:///x.jpg", "no host"),
    "invalid IPv6 host": ("http://[zz]/x.jpg", "cannot be parsed"),
    "invalid IDNA host": ("http://xn--zz.example/x.jpg", "cannot be parsed"),
    "label of 64": ("http://" + "c" * 64 + "/x.jpg", "label of 64 characters"),
}


@pytest.mark.parametrize("case", list(REDIRECTS))
def test_redirects_to_unfetchable_urls_are_a_400_naming_the_problem(
    hostile_server, hostile_origin, watch, case: str
) -> None:
    location, named = REDIRECTS[case]
    url = hostile_origin.serve(f"/redirect/{_slug(case)}", b"", {"Location": location}, status=302)
    with watch(hostile_server) as report:
        r, took = _detect(hostile_server, [url])
        assert_refused(r, (400,), "image 0: the URL redirected to", named)
        answers = concurrently(AT_ONCE, lambda _: _detect(hostile_server, [url] * 16))
    assert took < REFUSAL_S
    for r, took in answers:
        assert_refused(r, (400,), "redirected to", named)
        assert took < CONCURRENT_S
    report.assert_bounds(rss_growth_mb=RSS_MB)
