"""URL fetching: only public addresses by default, checked on every hop, capped and timed."""

from __future__ import annotations

import ipaddress
import re

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import (
    FetchError,
    ImageTooLargeError,
    InvalidUrlError,
    QueueFullApiError,
    UrlRefusedError,
)
from app.fetch import UNFETCHABLE, Fetcher, FetchPolicy, embedded_ipv4, is_public_address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "ff02::1",
        "::",
    ],
)
def test_non_global_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_global_addresses_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://2130706433/x.jpg",
        "http://0x7f.0.0.1/x.jpg",
        "http://0177.0.0.1/x.jpg",
        "http://127.1/x.jpg",
        "http://[::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/x.jpg",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://[::7f00:1]/x.jpg",
        "http://[2002:a00:1::]/x.jpg",
    ],
)
async def test_private_targets_are_refused_in_every_notation(url: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(
        (UrlRefusedError, InvalidUrlError),
        match="image 4: the URL (points to a private|cannot be parsed)",
    ):
        await fetcher.fetch(url, index=4)
    await fetcher.aclose()


@pytest.mark.parametrize("url", ["http://localhost/x.jpg", "http://localhost./x.jpg"])
async def test_private_names_get_the_same_answer_as_names_that_do_not_resolve(url: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(FetchError) as refused:
        await fetcher.fetch(url, index=4)
    assert refused.value.message == "image 4: " + UNFETCHABLE
    await fetcher.aclose()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/", "http:///nohost"]
)
async def test_other_schemes_and_hostless_urls_are_refused(url: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises((UrlRefusedError, InvalidUrlError), match="scheme|no host"):
        await fetcher.fetch(url, index=0)
    await fetcher.aclose()


async def test_allowed_host_is_fetched_but_a_redirect_to_a_private_host_is_refused(
    image_server: str,
) -> None:
    fetcher = Fetcher(FetchPolicy(allowed_hosts=frozenset({"127.0.0.1"})))
    assert (await fetcher.fetch(image_server + "/shapes.jpg", index=0))[:2] == b"\xff\xd8"
    with pytest.raises(FetchError, match="image 1: the URL cannot be fetched"):
        await fetcher.fetch(image_server + "/redirect-localhost", index=1)
    await fetcher.aclose()


async def test_body_over_the_byte_cap_is_refused(image_server: str) -> None:
    fetcher = Fetcher(FetchPolicy(allow_private=True, max_bytes=1000))
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000"):
        await fetcher.fetch(image_server + "/shapes.jpg", index=0)
    await fetcher.aclose()


async def test_slow_server_fails_within_the_total_deadline(image_server: str) -> None:
    # /slow answers after 3 s: the error itself proves the deadline fired (no timing bound,
    # which a loaded machine could break).
    fetcher = Fetcher(FetchPolicy(allow_private=True, timeout_s=0.5))
    with pytest.raises(FetchError, match="longer than 0.5 s"):
        await fetcher.fetch(image_server + "/slow", index=0)
    await fetcher.aclose()


async def test_too_many_redirects_are_refused(image_server: str) -> None:
    fetcher = Fetcher(FetchPolicy(allow_private=True, max_redirects=0))
    with pytest.raises(FetchError, match="redirected more than 0 times"):
        await fetcher.fetch(image_server + "/redirect", index=0)
    await fetcher.aclose()


async def test_connection_goes_to_the_checked_address_without_a_second_lookup(
    image_server: str, monkeypatch
) -> None:
    """DNS rebinding: the name is resolved once; the connection uses that very address."""
    import asyncio

    port = int(image_server.rsplit(":", 1)[1])
    answers = iter(["127.0.0.1", "203.0.113.9"])  # the second answer would be the rebind
    lookups: list[str] = []

    async def fake_getaddrinfo(host, port_, *args, **kwargs):
        lookups.append(host)
        return [(2, 1, 6, "", (next(answers), port_))]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    fetcher = Fetcher(FetchPolicy(allowed_hosts=frozenset({"images.rebind.test"})))
    data = await fetcher.fetch(f"http://images.rebind.test:{port}/shapes.jpg", index=0)
    await fetcher.aclose()
    assert data[:2] == b"\xff\xd8"
    assert lookups == ["images.rebind.test"], "the host was looked up more than once"


async def test_name_resolving_to_a_private_address_is_refused(monkeypatch) -> None:
    import asyncio

    async def fake_getaddrinfo(host, port_, *args, **kwargs):
        return [(2, 1, 6, "", ("10.0.0.7", port_)), (2, 1, 6, "", ("93.184.216.34", port_))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(FetchError, match="cannot be fetched"):
        await fetcher.fetch("https://mixed.example.test/cat.jpg", index=0)
    await fetcher.aclose()


# IPv6 forms that embed an IPv4 address: judged by the IPv4 address they carry. Each form with
# loopback, private, link-local (the metadata address), CGNAT and unspecified addresses inside.
EMBEDDED_PRIVATE = {
    "IPv4-compatible": ["::7f00:1", "::a00:1", "::a9fe:a9fe", "::c0a8:101", "::6440:1"],
    "IPv4-mapped": ["::ffff:7f00:1", "::ffff:a9fe:a9fe", "::ffff:ac10:1", "::ffff:0.0.0.0"],
    "SIIT": ["::ffff:0:7f00:1", "::ffff:0:a00:1", "::ffff:0:a9fe:a9fe", "::ffff:0:c0a8:1"],
    "NAT64": ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "64:ff9b::6440:1"],
    "NAT64 local-use": ["64:ff9b:1::7f00:1", "64:ff9b:1:a9fe:a9:fe00::", "64:ff9b:1::5db8:d822"],
    "6to4": ["2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:a00:1:1::1", "2002:c0a8:101::"],
    "Teredo": [
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # client 192.0.2.45 (documentation)
        "2001:0:7f00:1:0:0:a2ca:4d73",  # server 127.0.0.1
        "2001:0:5db8:d822:0:0:f5ff:fefe",  # client 10.0.1.1
    ],
}
# The same forms carrying global addresses: the address is as public as the one it carries
# (Teredo stays refused: 2001::/23 is not globally reachable, whatever it embeds).
EMBEDDED_PUBLIC = {
    "IPv4-compatible": ["::5db8:d822", "::808:808"],
    "IPv4-mapped": ["::ffff:5db8:d822", "::ffff:808:808"],
    "SIIT": ["::ffff:0:5db8:d822", "::ffff:0:808:808"],
    "NAT64": ["64:ff9b::5db8:d822", "64:ff9b::808:808"],
    "6to4": ["2002:5db8:d822::1", "2002:808:808:1::"],
}


@pytest.mark.parametrize(
    "address", [a for addresses in EMBEDDED_PRIVATE.values() for a in addresses]
)
def test_ipv6_forms_embedding_a_private_ipv4_address_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", [a for addresses in EMBEDDED_PUBLIC.values() for a in addresses]
)
def test_ipv6_forms_embedding_a_public_ipv4_address_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::7f00:1", ["127.0.0.1"]),
        ("::ffff:0:a9fe:a9fe", ["169.254.169.254"]),
        ("64:ff9b::a00:1", ["10.0.0.1"]),
        ("2002:c0a8:101::", ["192.168.1.1"]),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
        ("2606:2800:220:1:248:1893:25c8:1946", []),
    ],
)
def test_embedded_ipv4_addresses_are_extracted(address: str, embedded: list[str]) -> None:
    assert [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))] == embedded


def _resolving_to(monkeypatch, address: str) -> None:
    import asyncio

    async def fake_getaddrinfo(host, port_, *args, **kwargs):
        family = 10 if ":" in address else 2
        return [(family, 1, 6, "", (address, port_))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)


@pytest.mark.parametrize("address", ["64:ff9b::a9fe:a9fe", "::ffff:0:a00:1", "2002:7f00:1::1"])
async def test_name_resolving_to_an_embedded_private_address_is_refused(
    monkeypatch, address: str
) -> None:
    _resolving_to(monkeypatch, address)
    fetcher = Fetcher(FetchPolicy(), transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with pytest.raises(FetchError, match="cannot be fetched"):
        await fetcher.fetch("http://nat64.example.test/x.jpg", index=0)
    await fetcher.aclose()


async def test_unresolvable_private_and_refusing_hosts_get_one_answer(monkeypatch, caplog) -> None:
    """No DNS-existence oracle: the client cannot tell the three apart; the log can."""
    import asyncio
    import logging
    import socket

    from app.errors import ApiError

    answers: dict[str, object] = {
        "nxdomain.example.test": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        "internal.example.test": "10.1.2.3",
        "closed.example.test": "127.0.0.1",  # allowed host whose port refuses connections
    }

    async def fake_getaddrinfo(host, port_, *args, **kwargs):
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return [(2, 1, 6, "", (answer, port_))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    fetcher = Fetcher(FetchPolicy(allowed_hosts=frozenset({"closed.example.test"})))
    errors: list[ApiError] = []
    with caplog.at_level(logging.INFO, logger="app.fetch"):
        for host in answers:
            with pytest.raises(FetchError) as refused:
                await fetcher.fetch(f"http://{host}:{closed_port}/x.jpg", index=2)
            errors.append(refused.value)
    await fetcher.aclose()
    assert {(e.status_code, e.error_type, e.message) for e in errors} == {
        (400, "fetch_failed", "image 2: " + UNFETCHABLE)
    }
    logged = caplog.text
    assert "nxdomain.example.test" in logged and "no address" in logged
    assert "internal.example.test" in logged and "10.1.2.3" in logged
    assert "closed.example.test" in logged and "connection to 127.0.0.1 failed" in logged


async def _stream(data: bytes):
    """A body as a real transport hands it over: streamed, not read yet."""
    yield data


def _mock_fetcher(monkeypatch, handler, **policy) -> Fetcher:
    _resolving_to(monkeypatch, "93.184.216.34")
    return Fetcher(FetchPolicy(**policy), transport=httpx.MockTransport(handler))


async def test_downloads_ask_for_identity_only(monkeypatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_stream(b"\xff\xd8 pixels"))

    fetcher = _mock_fetcher(monkeypatch, handler)
    assert await fetcher.fetch("https://images.example.test/a.jpg", index=0) == b"\xff\xd8 pixels"
    await fetcher.aclose()
    assert seen[0].headers["accept-encoding"] == "identity"
    assert seen[0].headers["host"] == "images.example.test"
    assert seen[0].url.host == "93.184.216.34"


@pytest.mark.parametrize(
    ("coding", "named"),
    [
        ("gzip", "gzip"),
        ("br", "br"),
        ("deflate", "deflate"),
        ("zstd", "zstd"),
        ("gzip, gzip", "gzip, gzip"),
        ("identity, br", "br"),
        ("GZip", "gzip"),
    ],
)
async def test_compressed_responses_are_refused_before_reading(
    monkeypatch, coding: str, named: str
) -> None:
    import zlib

    read: list[bool] = []

    async def body():
        read.append(True)
        yield zlib.compress(bytes(1 << 20), wbits=31)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": coding}, content=body())

    fetcher = _mock_fetcher(monkeypatch, handler)
    with pytest.raises(FetchError, match=rf"image 3: the URL's response is compressed \({named}\)"):
        await fetcher.fetch("http://images.example.test/a.jpg", index=3)
    await fetcher.aclose()
    assert read == [], "the compressed body was read"


@pytest.mark.parametrize("coding", [None, "identity", ""])
async def test_a_body_declared_uncompressed_is_taken_as_it_is(monkeypatch, coding) -> None:
    """Whatever the body really is, nothing inflates it: httpx's decoders never run."""
    import zlib

    bomb = zlib.compress(bytes(1 << 24), wbits=31)
    headers = {} if coding is None else {"Content-Encoding": coding}
    fetcher = _mock_fetcher(
        monkeypatch, lambda r: httpx.Response(200, headers=headers, content=_stream(bomb))
    )
    assert await fetcher.fetch("http://images.example.test/a.jpg", index=0) == bomb
    await fetcher.aclose()


async def test_downloads_in_progress_share_one_buffer(monkeypatch) -> None:
    import asyncio

    release = asyncio.Event()

    async def held_body():
        yield bytes(800)
        await release.wait()
        yield bytes(100)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/held.jpg":
            return httpx.Response(200, content=held_body())
        return httpx.Response(200, content=_stream(bytes(300)))

    fetcher = _mock_fetcher(monkeypatch, handler, max_bytes=2000, max_buffered_bytes=1000)

    async def held_download() -> int:
        return len(await fetcher.fetch("http://a.example.test/held.jpg", index=0))

    held = asyncio.create_task(held_download())
    while fetcher._buffered < 800:
        await asyncio.sleep(0.001)
    with pytest.raises(QueueFullApiError, match="image 1: downloads in progress") as busy:
        await fetcher.fetch("http://a.example.test/other.jpg", index=1)
    assert busy.value.status_code == 429 and busy.value.headers["Retry-After"] == "1"
    release.set()
    assert await held == 900
    assert fetcher._buffered == 0, "the held body was freed, its share was not given back"
    other = await fetcher.fetch("http://a.example.test/other.jpg", index=1)
    assert other == bytes(300)
    assert fetcher._buffered == 300, "a body keeps its share while it is alive (decoding)"
    del other
    assert fetcher._buffered == 0
    await fetcher.aclose()


async def test_a_refused_body_gives_its_share_of_the_buffer_back(monkeypatch) -> None:
    async def two_pieces():
        yield bytes(800)
        yield bytes(800)  # passes the 1000-byte cap: refused with 800 bytes reserved

    fetcher = _mock_fetcher(
        monkeypatch,
        lambda r: httpx.Response(200, content=two_pieces()),
        max_bytes=1000,
        max_buffered_bytes=10_000,
    )
    for _ in range(20):  # 20 x 800 would pass the buffer if anything stayed reserved
        with pytest.raises(ImageTooLargeError):
            await fetcher.fetch("http://a.example.test/big.jpg", index=0)
    assert fetcher._buffered == 0
    await fetcher.aclose()


INVALID_URLS = {
    "invalid IDNA": [
        ("http://xn--zz.example/a.jpg", "cannot be parsed"),
        ("http://xn--.example/a.jpg", "cannot be parsed"),
        ("http://\u2603.example/a.jpg", "cannot be parsed"),
        ("http://a\u200db.example/a.jpg", "cannot be parsed"),
    ],
    "label too long": [
        ("http://" + "a" * 64 + ".example/a.jpg", "a label of 64 characters"),
        ("http://x." + "b" * 100 + "/a.jpg", "a label of 100 characters"),
        ("http://" + "c" * 64 + "/a.jpg", "a label of 64 characters"),
    ],
    "host too long or malformed": [
        ("http://" + "a1234567." * 33 + "example/", "over DNS's limit of 253"),
        ("http://a..example/a.jpg", "an empty label"),
        ("http://exa%20mple.com/a.jpg", "not allowed in a host name"),
        ("http://a%00b.example/a.jpg", "not allowed in a host name"),
    ],
    "not a URL": [
        ("http://[zz]/a.jpg", "cannot be parsed"),
        ("http://[::1/a.jpg", "cannot be parsed"),
        ("http://example.com:99999/a.jpg", "the port 99999, outside 1 to 65535"),
        ("http://example.com:0/a.jpg", "the port 0, outside"),
        ("http://exa\x00mple.com/", "cannot be parsed"),
    ],
}


@pytest.mark.parametrize(
    ("url", "named"), [case for cases in INVALID_URLS.values() for case in cases]
)
async def test_invalid_urls_are_a_400_naming_the_problem(monkeypatch, url, named) -> None:
    fetcher = _mock_fetcher(monkeypatch, lambda r: httpx.Response(200, content=b"x"))
    with pytest.raises(InvalidUrlError, match="image 5: the URL .*" + re.escape(named)) as bad:
        await fetcher.fetch(url, index=5)
    assert (bad.value.status_code, bad.value.error_type) == (400, "invalid_url")
    await fetcher.aclose()


@pytest.mark.parametrize(
    ("location", "error", "named"),
    [
        ("data:image/png;base64,iVBORw0KGgo=", UrlRefusedError, "has the scheme 'data'"),
        ("mailto:a@example.com", UrlRefusedError, "has the scheme 'mailto'"),
        ("javascript:alert(1)", UrlRefusedError, "has the scheme 'javascript'"),
        ("file:///etc/passwd", UrlRefusedError, "has the scheme 'file'"),
        ("https:///x.jpg", InvalidUrlError, "has no host"),
        ("http://[zz]/", InvalidUrlError, "cannot be parsed"),
        ("http://xn--zz.example/", InvalidUrlError, "cannot be parsed"),
        ("//" + "d" * 70 + "/x.jpg", InvalidUrlError, "a label of 70 characters"),
    ],
)
async def test_redirects_to_unfetchable_urls_are_a_400_naming_the_problem(
    monkeypatch, location, error, named
) -> None:
    fetcher = _mock_fetcher(
        monkeypatch, lambda r: httpx.Response(302, headers={"Location": location})
    )
    with pytest.raises(error, match=r"image 0: the URL redirected to .*" + re.escape(named)):
        await fetcher.fetch("http://a.example.test/x.jpg", index=0)
    await fetcher.aclose()


@settings(max_examples=300, deadline=None)
@given(
    host=st.text(min_size=1, max_size=80),
    location=st.text(max_size=60),
)
def test_no_url_or_redirect_raises_anything_but_a_typed_error(host: str, location: str) -> None:
    """Hosts and Location headers of any text: the answer is a typed 4xx or the bytes."""
    import asyncio
    import socket

    from app.errors import ApiError

    async def run() -> None:
        async def no_dns(*args, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME, "unknown")

        loop = asyncio.get_running_loop()
        loop.getaddrinfo = no_dns  # type: ignore[method-assign]

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(302, headers={"Location": location.encode("utf-8", "replace")})

        fetcher = Fetcher(FetchPolicy(allow_private=True), transport=httpx.MockTransport(handler))
        for url in (f"http://{host}/a.jpg", "http://127.0.0.1/a.jpg"):
            try:
                await fetcher.fetch(url, index=0)
            except ApiError as exc:
                assert 400 <= exc.status_code < 500, exc
        await fetcher.aclose()

    asyncio.run(run())


def test_a_downloaded_body_crosses_to_a_decode_process_as_plain_bytes() -> None:
    import pickle

    from app.fetch import _Body

    released: list[int] = []
    body = _Body(b"\xff\xd8 image bytes", released.append)
    copy = pickle.loads(pickle.dumps(body))
    assert type(copy) is bytes and copy == b"\xff\xd8 image bytes"
    del copy
    assert released == []  # the share stays with the original
    del body
    assert released == [len(b"\xff\xd8 image bytes")]
