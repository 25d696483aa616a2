"""OpenRequestsMiddleware with scripted ASGI messages: a disconnect after the body cancels the
handler, one after the response has started does not, the body reaches the handler untouched,
and the open-request count comes back to zero (the drain waits on it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.api.http.middleware import CLIENT_GONE
from app.api.http.open_requests import OpenRequestsMiddleware

BODY = [
    {"type": "http.request", "body": b"ab", "more_body": True},
    {"type": "http.request", "body": b"cd", "more_body": False},
]
DISCONNECT = {"type": "http.disconnect"}


class FakeRuntime:
    def __init__(self) -> None:
        self.open_requests = 0
        self.most = 0

    def request_started(self) -> None:
        self.open_requests += 1
        self.most = max(self.most, self.open_requests)

    def request_finished(self) -> None:
        self.open_requests -= 1


class Client:
    """Sends the body, then hangs up once `hang_up` is set."""

    def __init__(self) -> None:
        self.messages = list(BODY)
        self.hang_up = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await self.hang_up.wait()
        return DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def _scope(method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/v1/detect", "headers": []}


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def test_a_client_gone_after_its_body_cancels_the_request() -> None:
    client, runtime = Client(), FakeRuntime()
    got: list[bytes] = []
    cancelled = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(await _read_body(receive))
        client.hang_up.set()
        try:
            await asyncio.sleep(60)  # queued behind a long batch
        except asyncio.CancelledError:
            cancelled.set()
            raise

    scope = _scope()
    await asyncio.wait_for(
        OpenRequestsMiddleware(app, runtime)(scope, client.receive, client.send),  # type: ignore[arg-type]
        5,
    )
    assert got == [b"abcd"]  # the body reached the handler whole, in order
    assert cancelled.is_set()
    assert scope[CLIENT_GONE] is True  # counted as 499
    assert client.sent == []
    assert (runtime.most, runtime.open_requests) == (1, 0)


async def test_an_answer_already_started_is_not_cancelled() -> None:
    client, runtime = Client(), FakeRuntime()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        client.hang_up.set()
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"{}"})

    scope = _scope()
    await asyncio.wait_for(
        OpenRequestsMiddleware(app, runtime)(scope, client.receive, client.send),  # type: ignore[arg-type]
        5,
    )
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert CLIENT_GONE not in scope
    assert runtime.open_requests == 0


async def test_a_failing_handler_raises_through_and_is_still_counted_out() -> None:
    client, runtime = Client(), FakeRuntime()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _read_body(receive)
        raise RuntimeError("boom")

    middleware = OpenRequestsMiddleware(app, runtime)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):
        await middleware(_scope(), client.receive, client.send)  # type: ignore[arg-type]
    assert runtime.open_requests == 0


async def test_other_methods_pass_through_uncounted() -> None:
    client, runtime = Client(), FakeRuntime()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    await OpenRequestsMiddleware(app, runtime)(_scope("GET"), client.receive, client.send)  # type: ignore[arg-type]
    assert runtime.most == 0 and len(client.sent) == 1
