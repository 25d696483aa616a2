"""Limits of the HTTP server itself, before a request reaches the app: header size, header read
time, connections, keep-alive, backlog. `uvicorn_limits(settings)` is every uvicorn keyword
they need, in one place.

uvicorn has neither a header size limit with httptools (only its h11 parser has one) nor a
header read timeout with either parser: a 256 MB header took 62 s to answer (httptools
accumulates the value by concatenation) and a connection that sends a byte now and then is held
forever. HeaderGuardProtocol adds both to uvicorn's httptools protocol, written by hand because
uvicorn offers neither; it relies on uvicorn's `cycle` (the request whose headers were parsed
last) and `on_response_complete`, both present in uvicorn's two HTTP protocols.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings

logger = logging.getLogger(__name__)

# After refusing, the connection is read and discarded this long before it is closed, so that
# the client reads the answer instead of a reset (closing with unread data sends a RST).
_LINGER_S = 1.0


class HeaderGuardProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: a request's line and headers must arrive within
    `header_timeout_s` (counted from the connection, or from the previous response on a
    keep-alive connection) and within `max_header_bytes`; else 408 or 431, and close."""

    def __init__(
        self, *args: Any, max_header_bytes: int, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_header_bytes = max_header_bytes
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: object = None
        self._header_bytes = 0
        self._tail = b""  # the last bytes counted: a header terminator may span two reads
        self._discarding = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._header_timer is None:
            super().data_received(data)
            return
        # Counted before the parser sees them: headers that arrive whole in one read (up to
        # 256 KiB on asyncio's loop) were parsed and served before a count made after the
        # parse could refuse them. A body in the same read is not counted.
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
        self._tail = window[-3:]
        if self._header_bytes > self.max_header_bytes:
            if not self.transport.is_closing():
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    "header_too_large",
                    "the request line and headers are over the limit of "
                    f"{self.max_header_bytes} bytes",
                )
            return
        super().data_received(data)
        if self.cycle is not self._waiting_after:
            self._stop_waiting()  # the headers are complete: the app has the request now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._stop_waiting()
        self._waiting_after = self.cycle
        self._header_bytes = 0
        self._tail = b""
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.cycle is self._waiting_after and not busy and not self.transport.is_closing():
            self._refuse(
                408,
                "Request Timeout",
                "header_timeout",
                "the request headers did not arrive within the limit of "
                f"{self.header_timeout_s:g} s",
            )

    def _refuse(self, status: int, reason: str, error_type: str, message: str) -> None:
        self._stop_waiting()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client"
        logger.info("%s from %s: %s", status, client, message)
        body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        self._discarding = True
        # Out of the count of max_connections now: it is only being drained until it closes.
        self.connections.discard(self)
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def uvicorn_limits(settings: Settings, workers: int = 1) -> dict[str, Any]:
    """The keyword arguments of uvicorn.run / uvicorn.Config that bound what clients can hold.
    uvicorn counts connections per worker process: `max_connections` is shared among them."""
    return {
        # A partial of a module-level class: it pickles, should uvicorn spawn workers.
        "http": functools.partial(
            HeaderGuardProtocol,
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
        ),
        # The same bound, should the h11 parser be chosen instead.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": max(1, -(-settings.max_connections // workers)),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "backlog": settings.backlog,
    }
