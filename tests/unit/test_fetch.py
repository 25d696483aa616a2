"""URL fetching: only public addresses by default, checked on every hop, capped and timed."""

from __future__ import annotations

import ipaddress

import pytest

from app.errors import FetchError, ImageTooLargeError, UrlRefusedError
from app.fetch import Fetcher, FetchPolicy, is_public_address


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
        "http://localhost/x.jpg",
        "http://2130706433/x.jpg",
        "http://0x7f.0.0.1/x.jpg",
        "http://0177.0.0.1/x.jpg",
        "http://127.1/x.jpg",
        "http://localhost./x.jpg",
        "http://[::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0/x.jpg",
    ],
)
async def test_private_targets_are_refused_in_every_notation(url: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(
        UrlRefusedError, match="image 4: the URL (points to a private|cannot be parsed)"
    ):
        await fetcher.fetch(url, index=4)
    await fetcher.aclose()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/", "http:///nohost"]
)
async def test_other_schemes_and_hostless_urls_are_refused(url: str) -> None:
    fetcher = Fetcher(FetchPolicy())
    with pytest.raises(UrlRefusedError):
        await fetcher.fetch(url, index=0)
    await fetcher.aclose()


async def test_allowed_host_is_fetched_but_a_redirect_to_a_private_host_is_refused(
    image_server: str,
) -> None:
    fetcher = Fetcher(FetchPolicy(allowed_hosts=frozenset({"127.0.0.1"})))
    assert (await fetcher.fetch(image_server + "/shapes.jpg", index=0))[:2] == b"\xff\xd8"
    with pytest.raises(UrlRefusedError, match="image 1"):
        await fetcher.fetch(image_server + "/redirect-localhost", index=1)
    await fetcher.aclose()


async def test_body_over_the_byte_cap_is_refused(image_server: str) -> None:
    fetcher = Fetcher(FetchPolicy(allow_private=True, max_bytes=1000))
    with pytest.raises(ImageTooLargeError, match="over the limit of 1000"):
        await fetcher.fetch(image_server + "/shapes.jpg", index=0)
    await fetcher.aclose()


async def test_slow_server_fails_within_the_total_deadline(image_server: str) -> None:
    import time

    fetcher = Fetcher(FetchPolicy(allow_private=True, timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(FetchError, match="longer than 0.5 s"):
        await fetcher.fetch(image_server + "/slow", index=0)
    assert time.monotonic() - started < 2
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
    with pytest.raises(UrlRefusedError, match="private"):
        await fetcher.fetch("https://mixed.example.test/cat.jpg", index=0)
    await fetcher.aclose()
