"""Safe download of image URLs given by clients.

The host is resolved once, every address is checked (only global unicast addresses unless
private URLs are allowed), and the connection goes to the checked address, so a second DNS
answer cannot redirect it (DNS rebinding). Each redirect hop is checked again; the body is
read uncompressed, as it comes off the wire, under a byte cap, and the whole download under
one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import httpx

from app.errors import (
    ApiError,
    FetchError,
    ImageTooLargeError,
    InvalidUrlError,
    QueueFullApiError,
    UrlRefusedError,
)

logger = logging.getLogger(__name__)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One answer for every way a named host cannot be reached: it does not resolve, it resolves
# to an address this server does not fetch, or nothing accepts the connection. Separate
# answers would let any client map the names in the server's DNS view (internal names that
# exist, and whether they are private); the server log keeps the detail. URLs whose host is
# an IP literal reveal nothing by their answer and keep the precise "private address" one.
UNFETCHABLE = (
    "the URL cannot be fetched: its host does not resolve, resolves to an address that this "
    "server does not fetch (private, loopback or reserved), or refused the connection"
)

# DNS host names as resolvers accept them (RFC 1035 lengths; letters, digits, hyphen, and the
# underscore that real names carry), checked on the IDNA (ASCII) form that is looked up.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_MAX_HOST_CHARS = 253

# IPv6 forms that carry an IPv4 address; the address is judged by the IPv4 one too, since a
# translator (NAT64, SIIT, 6to4 relay, a dual-stack socket) delivers to it.
_IPV4_IN_LOW_32_BITS = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), e.g. ::7f00:1
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # SIIT IPv4-translated, ::ffff:0:a.b.c.d
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
# Local-use NAT64 (RFC 8215): the operator picks the prefix length (/48 to /96), so where the
# IPv4 address sits cannot be known here; it only ever leads into a local network.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 10.0
    connect_timeout_s: float = 3.0
    max_redirects: int = 3
    max_concurrent: int = 32
    max_buffered_bytes: int = 128 * 1024 * 1024


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped, IPv4-compatible, SIIT, NAT64
    well-known prefix, 6to4, Teredo (server and client); empty for any other address."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if any(ip in net for net in _IPV4_IN_LOW_32_BITS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def is_public_address(ip: IPAddress) -> bool:
    """True for global unicast addresses. An IPv6 address that embeds IPv4 is public only if
    every IPv4 address in it is (IPv4-mapped is judged by its IPv4 address alone)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64_LOCAL:
            return False
        if not all(is_public_address(v4) for v4 in embedded_ipv4(ip)):
            return False
    return ip.is_global and not ip.is_multicast


def _is_ip_literal(host: str) -> bool:
    """An address written as the host: IPv6, dotted IPv4, or the legacy IPv4 forms that the
    resolver reads without a lookup (inet_aton: `2130706433`, `0x7f.1`, `127.1`)."""
    if ":" in host:
        return True
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


class Fetcher:
    """Downloads image bytes for the API; one per app, sharing the limits of all downloads."""

    def __init__(self, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None):
        self.policy = policy
        # Requests go straight to a transport, not through an httpx client: the client parses
        # every redirect's Location even when it does not follow redirects, and raises
        # InvalidURL (not an HTTPError) on a `data:` or `mailto:` one; it also keeps a cookie
        # jar that every origin could fill, shared by all downloads. We follow redirects here.
        # Each download gets its own connection pool, closed when it ends: a download
        # cancelled mid-request (a sibling image failed) leaves its connection ACTIVE in a
        # shared httpcore pool for good, and 100 of those stall every later download.
        self._shared_transport = transport  # tests hand in a mock
        self._ssl = httpx.create_ssl_context()  # loading the CA bundle once, not per download
        self._timeouts = httpx.Timeout(policy.timeout_s, connect=policy.connect_timeout_s)
        self._slots = asyncio.Semaphore(policy.max_concurrent)
        # Bytes of downloaded bodies alive, in progress or waiting for their decode, all
        # requests together. Without it, 32 download slots times the 32 MiB cap is 1 GiB held,
        # and 8 requests of 16 mid-size bodies pile up behind the decode threads. A body is
        # released when its last reference goes (_Body.__del__, on whichever thread): a lock.
        self._buffered = 0
        self._buffer_lock = threading.Lock()

    async def aclose(self) -> None:
        if self._shared_transport is not None:
            await self._shared_transport.aclose()

    async def fetch(self, url: str, *, index: int) -> bytes:
        try:
            return await self._fetch_in_slot(url, index)
        except (ApiError, asyncio.CancelledError) as exc:
            # A refused or cancelled download's traceback and chained exception keep each of
            # its frames alive (the body read so far, the connection, the bytes the event loop
            # queued for it) in a cycle through the request's task, until a full collection:
            # hundreds of MB under a flood of refusals. The client's answer needs none of it.
            exc.__traceback__ = None
            exc.__context__ = None
            raise

    async def check(self, url: str, *, what: str = "the URL") -> None:
        """Refuse now what fetch() would refuse before connecting (scheme, host, an address the
        SSRF rules do not allow): a job's URL is answered 400 at submission, then fetched, and
        checked again hop by hop, by the job runner."""
        parsed = self._parse(url, 0, what)
        await self._checked_address(parsed, self._checked_host(parsed, 0, what), 0)

    async def _fetch_in_slot(self, url: str, index: int) -> bytes:
        async with self._slots:
            transport = self._shared_transport or httpx.AsyncHTTPTransport(verify=self._ssl)
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._fetch_following_redirects(url, index, transport)
            except TimeoutError:
                raise FetchError(
                    f"downloading the URL took longer than {self.policy.timeout_s:g} s",
                    image_index=index,
                ) from None
            finally:
                if transport is not self._shared_transport:
                    await transport.aclose()

    async def _fetch_following_redirects(
        self, url: str, index: int, transport: httpx.AsyncBaseTransport
    ) -> bytes:
        what = "the URL"
        current = self._parse(url, index, what)
        for _hop in range(self.policy.max_redirects + 1):
            host = self._checked_host(current, index, what)
            address = await self._checked_address(current, host, index)
            request = self._pinned_request(current, host, address)
            try:
                response = await transport.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._refuse_quietly(host, index, f"connection to {address} failed: {exc!r}")
            except httpx.TimeoutException:
                raise FetchError(
                    "the URL's server did not answer in time", image_index=index
                ) from None
            except httpx.HTTPError as exc:
                logger.info("image %d: %r sent no valid HTTP response: %r", index, host, exc)
                raise FetchError(
                    "the URL's server did not send a valid HTTP response", image_index=index
                ) from None
            response.request = request
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    location = response.headers["location"]
                    what = f"the URL redirected to {_short(location)!r}, which"
                    current = self._parse(location, index, what, base=current)
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

    @staticmethod
    def _parse(url: str, index: int, what: str, base: httpx.URL | None = None) -> httpx.URL:
        """The URL (a redirect's Location is read against `base`), or a 400 naming the problem
        with `what` as its subject."""
        try:
            parsed = httpx.URL(url) if base is None else base.join(url)
            parsed.host  # noqa: B018 (decoding the IDNA host validates its A-labels)
        except (httpx.InvalidURL, ValueError) as exc:  # IDNAError and UnicodeError included
            raise InvalidUrlError(
                f"{what} cannot be parsed: {_short(exc)}", image_index=index
            ) from None
        if parsed.scheme not in ("http", "https"):
            raise UrlRefusedError(
                f"{what} has the scheme {_short(parsed.scheme)!r}; only http and https URLs "
                "are fetched",
                image_index=index,
            )
        if not parsed.raw_host:
            raise InvalidUrlError(f"{what} has no host", image_index=index)
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise InvalidUrlError(
                f"{what} has the port {parsed.port}, outside 1 to 65535", image_index=index
            )
        return parsed

    @staticmethod
    def _checked_host(url: httpx.URL, index: int, what: str) -> str:
        """The host as it is looked up (IDNA, lower case, no trailing dot), or a 400 that
        names what is wrong with it: the resolver would fail on it in less useful ways."""
        host = url.raw_host.decode("ascii").rstrip(".").lower()
        if _is_ip_literal(host):
            return host
        problem = None
        if len(host) > _MAX_HOST_CHARS:
            problem = f"a host of {len(host)} characters, over DNS's limit of {_MAX_HOST_CHARS}"
        for label in host.split("."):
            if problem:
                break
            if not label:
                problem = "a host with an empty label"
            elif len(label) > 63:
                problem = f"a host with a label of {len(label)} characters, over DNS's limit of 63"
            elif not _LABEL.fullmatch(label):
                problem = "a host with a character not allowed in a host name"
        if problem:
            raise InvalidUrlError(f"{what} has {problem}", image_index=index)
        return host

    async def _checked_address(self, url: httpx.URL, host: str, index: int) -> IPAddress:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:
            self._refuse_quietly(host, index, f"no address: {exc!r}")
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        trusted = self.policy.allow_private or host in self.policy.allowed_hosts
        if not trusted:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused or not addresses:
                if not _is_ip_literal(host):
                    self._refuse_quietly(host, index, f"resolves to non-public {refused}")
                logger.info("image %d: refused URL host %r (not public)", index, host)
                raise UrlRefusedError(
                    "the URL points to a private, loopback or reserved address, which is not "
                    "fetched",
                    image_index=index,
                )
        return addresses[0]

    @staticmethod
    def _refuse_quietly(host: str, index: int, detail: str) -> NoReturn:
        logger.info("image %d: URL host %r cannot be fetched: %s", index, host, detail)
        raise FetchError(UNFETCHABLE, image_index=index) from None

    def _pinned_request(self, url: httpx.URL, host: str, address: IPAddress) -> httpx.Request:
        """A request to the checked address, carrying the original Host and TLS server name."""
        extensions: dict[str, object] = {"timeout": self._timeouts.as_dict()}
        if url.scheme == "https":
            extensions["sni_hostname"] = host
        name = f"[{host}]" if ":" in host else host
        host_header = name if url.port is None else f"{name}:{url.port}"
        headers = {
            "Host": host_header,
            "User-Agent": "detr-serve",
            # httpx asks for gzip, deflate, br (and zstd) by default and inflates each chunk
            # whole, on the event loop, before a byte cap can count it: a 6 KB brotli body
            # becomes 4 GiB. Images are compressed already: identity only.
            "Accept-Encoding": "identity",
        }
        return httpx.Request(
            "GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions
        )

    async def _read_capped(self, response: httpx.Response, index: int) -> bytes:
        # Any content coding is refused, stacked ones included: inflating would need a cap on
        # the output of each decoder and a thread to run it on, for images that are
        # compressed already. Whatever the header says, the body is read with aiter_raw, the
        # bytes as they come off the wire: httpx never runs a decoder, and the cap counts
        # exactly what is held in memory.
        codings = [
            c.strip().lower()
            for c in response.headers.get_list("content-encoding", split_commas=True)
        ]
        coded = [c for c in codings if c not in ("", "identity")]
        if coded:
            raise FetchError(
                f"the URL's response is compressed ({_short(', '.join(coded))}); detr-serve "
                "fetches images uncompressed (Content-Encoding identity)",
                image_index=index,
            )
        declared = response.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.policy.max_bytes:
            raise ImageTooLargeError(
                f"the URL's body is {declared} bytes, over the limit of {self.policy.max_bytes}",
                image_index=index,
            )
        chunks: list[bytes] = []
        size = 0
        body: _Body | None = None
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.policy.max_bytes:
                    raise ImageTooLargeError(
                        f"the URL's body is over the limit of {self.policy.max_bytes} bytes",
                        image_index=index,
                    )
                if not self._reserve(len(chunk)):
                    raise QueueFullApiError(
                        "downloads in progress already hold the server's download buffer of "
                        f"{self.policy.max_buffered_bytes} bytes; retry later",
                        image_index=index,
                        headers={"Retry-After": "1"},
                    )
                chunks.append(chunk)
            # The reservation passes to the body and ends when the body is freed.
            body = _Body(b"".join(chunks), self._release)
            return body
        except httpx.TimeoutException:
            raise FetchError("the URL's server stopped sending", image_index=index) from None
        except httpx.HTTPError as exc:
            logger.info("image %d: the body broke off: %r", index, exc)
            raise FetchError(
                "the URL's body broke off or is not valid HTTP", image_index=index
            ) from None
        finally:
            # A traceback keeps this frame, and so the pieces read, alive until the cyclic GC
            # finds it (the request's task holds the exception that holds the frame).
            if body is None:
                self._release(sum(len(c) for c in chunks))
            chunks.clear()

    def _reserve(self, size: int) -> bool:
        with self._buffer_lock:
            if self._buffered + size > self.policy.max_buffered_bytes:
                return False
            self._buffered += size
            return True

    def _release(self, size: int) -> None:
        with self._buffer_lock:
            self._buffered -= size


class _Body(bytes):
    """Downloaded bytes that give their share of the download buffer back when freed."""

    _release: Callable[[int], None]

    def __new__(cls, data: bytes, release: Callable[[int], None]) -> _Body:
        body = super().__new__(cls, data)
        body._release = release
        return body

    def __del__(self) -> None:
        self._release(len(self))

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        # Sent to a decode worker process as plain bytes: the share stays with this object.
        return bytes, (bytes(self),)


def _short(value: object, limit: int = 100) -> str:
    """A client- or server-given text quoted in an error, cut to a readable length."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
