"""Pure ASGI middleware: request ids, request metrics and the request body limit.

Pure ASGI (not BaseHTTPMiddleware) keeps streaming bodies streaming and costs little.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLargeError
from app.logging_setup import request_id_var
from app.metrics import Metrics

logger = logging.getLogger(__name__)

_MAX_CACHED_LABELS = 256
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/=+\-]{1,128}$")
# Set in the scope of a request whose client went away before its answer
# (app/api/http/open_requests.py): counted and logged as 499, nginx's "client closed request".
CLIENT_GONE = "detr_serve.client_gone"


class RequestContextMiddleware:
    """Tags each request with an id (the client's X-Request-ID when sane) and records metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, kept: labels() takes a lock and builds a key on every call.
        # Bounded, since a client chooses the method: past the bound, labels() on each call.
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = client_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope.get(CLIENT_GONE):
                status = 499
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            key = (scope["method"], path, status)
            counter = self._counted.get(key)
            if counter is None:
                counter = self.metrics.requests.labels(key[0], path, str(status))
                if len(self._counted) < _MAX_CACHED_LABELS:
                    self._counted[key] = counter
            counter.inc()
            timer = self._timed.get(path)
            if timer is None:
                timer = self.metrics.request_latency.labels(path)
                if len(self._timed) < _MAX_CACHED_LABELS:
                    self._timed[path] = timer
            timer.observe(elapsed)
            # One line per request, at the boundary: failures always, successes at debug.
            level = (
                logging.WARNING
                if status >= 500
                else logging.INFO
                if status >= 400
                else logging.DEBUG
            )
            logger.log(
                level,
                "%s %s -> %d in %.1f ms",
                scope["method"],
                scope["path"],
                status,
                elapsed * 1e3,
            )
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Answers 413 when a request body is larger than the limit, without reading it all."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: dict[str, int] | None = None) -> None:
        """`paths`: another limit for these exact paths (the job uploads of /v1/jobs)."""
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope.get("path", ""), self.max_bytes)
        declared = _header(scope, b"content-length")
        # ASCII digits only: str.isdigit says yes to '²', which int() then refuses.
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and (len(declared) > 20 or int(declared) > limit)
        ):
            await _send_error(
                send,
                scope,
                413,
                PayloadTooLargeError.error_type,
                _too_large(limit),
                [(b"connection", b"close")],
            )
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(_too_large(limit))
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


async def _send_error(
    send: Send,
    scope: Scope,
    status: int,
    error_type: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error answered by middleware, in the shape of the API the path belongs to
    (the KServe v2 protocol wants {"error": "..."})."""
    payload: object = (
        {"error": message}
        if scope["path"].startswith("/v2")
        else {"error": {"type": error_type, "message": message}}
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


API_KEY_MESSAGE = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def bearer_matches(authorization: str | None, expected: bytes) -> bool:
    """Whether an Authorization value is `Bearer <expected>` (scheme case-insensitive; the
    HTTP middleware and the gRPC `authorization` metadata share this rule)."""
    scheme, _, credentials = (authorization or "").partition(" ")
    given = credentials.strip(" ").encode("latin-1", errors="replace")
    # compare_digest: the time taken does not tell an attacker how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)


def client_request_id(given: str | None) -> str:
    """The client's request id when it is sane, else a new one (HTTP and gRPC alike)."""
    return given if given and _CLIENT_ID.match(given) else new_request_id()


class _RequestIds:
    """New request ids: 32 hex digits, a random 64-bit prefix per process and a counter. Unique
    like uuid4().hex without its read of the system's random source per request (a system
    call, the largest part of the request-id work); the prefix is drawn again in a forked child."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds()


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every path but health, docs and (unless
    `protect_metrics`) metrics. The scheme is case-insensitive (RFC 7235 section 2.1)."""

    EXEMPT = frozenset(
        {
            "/healthz",
            "/readyz",
            "/v2/health/live",
            "/v2/health/ready",
            "/docs",
            "/docs/oauth2-redirect",
            "/redoc",
            "/openapi.json",
        }
    )
    EXEMPT_PREFIXES = ("/docs/static/",)

    def __init__(
        self,
        app: ASGIApp,
        api_key: str,
        protect_metrics: bool = False,
        exempt_paths: frozenset[str] = frozenset(),
        exempt_prefixes: tuple[str, ...] = (),
    ) -> None:
        """`exempt_paths` and `exempt_prefixes` add to EXEMPT (the browser page: it holds no
        data, and its own requests carry the key)."""
        self.app = app
        self._expected = api_key.encode()
        exempt = self.EXEMPT | exempt_paths
        self._exempt = exempt if protect_metrics else exempt | {"/metrics"}
        self._prefixes = self.EXEMPT_PREFIXES + exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self._exempt or path.startswith(self._prefixes):
            await self.app(scope, receive, send)
            return
        if bearer_matches(_header(scope, b"authorization"), self._expected):
            await self.app(scope, receive, send)
            return
        message = API_KEY_MESSAGE
        await _send_error(
            send, scope, 401, "unauthorized", message, [(b"www-authenticate", b"Bearer")]
        )
