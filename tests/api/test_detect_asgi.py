"""The plain-ASGI /v1/detect (app/api/v1/detect_asgi.py) against the declared FastAPI route it
stands in front of: the same answers, errors and headers for the same requests; its own
failure modes (a client gone before its body, an unexpected error) answered as the router's
would be."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.api.v1 import detect_asgi
from app.api.v1.detect_asgi import DetectRoute
from tests.api.conftest import assert_error, b64
from tests.conftest import shapes_image


def _router_client(app: Any) -> httpx.AsyncClient:
    """A client of the declared route: what lies behind DetectRoute in the app's stack
    (FastAPI's exception handlers and router)."""
    layer = app.build_middleware_stack()
    while not isinstance(layer, DetectRoute):
        layer = layer.app
    behind = layer.app

    async def router(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = app  # what Starlette's __call__ sets; the dependencies read app.state
        await behind(scope, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(router), base_url="http://test")


def _hot_path_client(app: Any) -> httpx.AsyncClient:
    """A client of DetectRoute alone, with a router behind it that fails the test if reached."""

    async def must_not_route(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"routed: {scope['method']} {scope['path']}")

    hot = DetectRoute(must_not_route, app.state.runtime)
    return httpx.AsyncClient(transport=httpx.ASGITransport(hot), base_url="http://test")


def _without_timings(body: dict[str, Any]) -> dict[str, Any]:
    for result in body.get("results", []):
        result.pop("timings")
    return body


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("json", {"json": {"images": [{"data": b64(shapes_image(320, 240))}], "threshold": 0.0}}),
    (
        "multipart",
        {
            "files": [
                ("file", ("a.jpg", shapes_image(200, 150))),
                ("file", ("b.jpg", shapes_image())),
            ],
            "data": {"max_detections": "2", "classes": "0,1"},
        },
    ),
    ("422 field named", {"json": {"images": [{"data": "x"}], "threshold": 7}}),
    ("422 multipart field", {"files": [("file", ("a.jpg", b"x"))], "data": {"threshold": "x"}}),
    ("400 image", {"json": {"images": [{"data": b64(b"not an image")}]}}),
    ("400 json", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("400 no file", {"data": {"threshold": "0.5"}, "files": [("other", ("a", b"x"))]}),
    ("415", {"content": b"x", "headers": {"content-type": "text/plain"}}),
    ("415 encoding", {"content": b"{}", "headers": {"content-type": "application/json",
                                                    "content-encoding": "gzip"}}),
]  # fmt: skip


@pytest.mark.parametrize("case", [c for c, _ in REQUESTS])
async def test_hot_path_answers_as_the_declared_route(client_factory, case: str) -> None:
    kwargs = dict(REQUESTS)[case]
    client, _ = await client_factory()
    app = client._transport.app  # type: ignore[attr-defined]
    async with _hot_path_client(app) as hot, _router_client(app) as routed:
        got = await hot.post("/v1/detect", **kwargs)
        expected = await routed.post("/v1/detect", **kwargs)
    assert got.status_code == expected.status_code, (got.text, expected.text)
    assert got.headers["content-type"] == expected.headers["content-type"]
    assert int(got.headers["content-length"]) == len(got.content)
    assert _without_timings(got.json()) == _without_timings(expected.json())


async def test_hot_path_refuses_while_draining_like_the_router(client_factory) -> None:
    client, _ = await client_factory()
    app = client._transport.app  # type: ignore[attr-defined]
    app.state.runtime._state = "draining"
    body = {"images": [{"data": b64(shapes_image())}]}
    async with _hot_path_client(app) as hot, _router_client(app) as routed:
        got = await hot.post("/v1/detect", json=body)
        expected = await routed.post("/v1/detect", json=body)
    assert_error(got, 503, "unavailable", "draining")
    assert got.json() == expected.json()
    assert got.headers["retry-after"] == expected.headers["retry-after"] == "1"


async def test_other_methods_and_paths_go_on_to_the_router(client) -> None:
    assert (await client.get("/v1/detect")).status_code == 405
    r = await client.post("/v1/render", json={"images": [{"data": b64(shapes_image())}]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


async def test_an_unexpected_error_is_a_json_500_and_logged(client, monkeypatch, caplog) -> None:
    async def boom(*_: Any) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(detect_asgi, "answer_detect", boom)
    r = await client.post("/v1/detect", json={"images": [{"data": b64(shapes_image())}]})
    assert_error(r, 500, "internal_error", "internal server error")
    assert "boom" in caplog.text
    assert r.headers["x-request-id"]  # the middleware around it still ran


async def test_a_client_gone_before_its_body_gets_no_answer(client) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    messages = [
        {"type": "http.request", "body": b'{"images": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/detect", "raw_path": b"/v1/detect",
        "query_string": b"", "headers": [(b"content-type", b"application/json")],
        "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("c", 1),
        "root_path": "",
    }  # fmt: skip
    await DetectRoute(app.router, app.state.runtime)(scope, receive, send)
    assert sent == []
    assert scope["detr_serve.client_gone"] is True
