"""Safe download of image URLs given by clients.

The host is resolved once, every address is checked (only global unicast addresses unless
private URLs are allowed), and the connection goes to the checked address, so a second DNS
answer cannot redirect it (DNS rebinding). Each redirect hop is checked again; the body is
streamed under a byte cap and the whole download under one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass, field

import httpx

from app.errors import FetchError, ImageTooLargeError, UrlRefusedError

logger = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    max_redirects: int = 3
    max_concurrent: int = 32


def is_public_address(ip: IPAddress) -> bool:
    """True for global unicast addresses; IPv4-mapped IPv6 is judged by its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class Fetcher:
    """Downloads image bytes for the API; one per app, sharing a connection pool."""

    def __init__(self, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None):
        self.policy = policy
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(policy.timeout_s, connect=policy.connect_timeout_s),
            headers={"User-Agent": "detr-serve"},
        )
        self._slots = asyncio.Semaphore(policy.max_concurrent)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, index: int) -> bytes:
        async with self._slots:
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._fetch_following_redirects(url, index)
            except TimeoutError:
                raise FetchError(
                    f"downloading the URL took longer than {self.policy.timeout_s:g} s",
                    image_index=index,
                ) from None

    async def _fetch_following_redirects(self, url: str, index: int) -> bytes:
        current = self._parse(url, index)
        for _hop in range(self.policy.max_redirects + 1):
            address = await self._checked_address(current, index)
            request = self._pinned_request(current, address)
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise FetchError(
                    f"could not download the URL ({type(exc).__name__})", image_index=index
                ) from None
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    current = self._parse(str(current.join(response.headers["location"])), index)
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        f"the URL answered HTTP {response.status_code}", image_index=index
                    )
                return await self._read_capped(response, index)
            finally:
                await response.aclose()
        raise FetchError(
            f"the URL redirected more than {self.policy.max_redirects} times", image_index=index
        )

    def _parse(self, url: str, index: int) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except Exception:
            raise UrlRefusedError("the URL cannot be parsed", image_index=index) from None
        if parsed.scheme not in ("http", "https"):
            raise UrlRefusedError("only http and https URLs are fetched", image_index=index)
        if not parsed.host:
            raise UrlRefusedError("the URL has no host", image_index=index)
        return parsed

    async def _checked_address(self, url: httpx.URL, index: int) -> IPAddress:
        host = url.host.rstrip(".").lower()
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            raise FetchError(
                f"the host {host!r} could not be resolved", image_index=index
            ) from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        trusted = self.policy.allow_private or host in self.policy.allowed_hosts
        if not trusted:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused or not addresses:
                logger.info("refused URL host %s resolving to %s", host, refused)
                raise UrlRefusedError(
                    "the URL points to a private, loopback or reserved address, which is not "
                    "fetched",
                    image_index=index,
                )
        return addresses[0]

    def _pinned_request(self, url: httpx.URL, address: IPAddress) -> httpx.Request:
        """A request to the checked address, carrying the original Host and TLS server name."""
        ip_host = f"[{address}]" if address.version == 6 else str(address)
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        host_header = url.host if url.port is None else f"{url.host}:{url.port}"
        return self._client.build_request(
            "GET",
            url.copy_with(host=ip_host.strip("[]")),
            headers={"Host": host_header},
            extensions=extensions,
        )

    async def _read_capped(self, response: httpx.Response, index: int) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise ImageTooLargeError(
                f"the URL's body is {declared} bytes, over the limit of {self.policy.max_bytes}",
                image_index=index,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.policy.max_bytes:
                raise ImageTooLargeError(
                    f"the URL's body is over the limit of {self.policy.max_bytes} bytes",
                    image_index=index,
                )
            chunks.append(chunk)
        return b"".join(chunks)
