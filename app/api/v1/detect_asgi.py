"""POST /v1/detect as plain ASGI, in front of FastAPI's router: the hot path of the service.

The route stays declared in app/api/v1/detect.py (the OpenAPI document, and an app built
without this layer); this layer answers it first with the same parsing, door and answer
(app/api/v1/detect.py's `answer_detect`, app/api/http/deps.py's `intake_of`) and skips what
FastAPI adds per request for a route that reads its own body: route matching over every
route, the dependency solver, the Request and Response objects, the exception middleware.
It sits innermost among the middleware (app/main.py), so request ids, metrics, the open
request count and disconnect cancellation, CORS, the API key and the body limit all apply.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import orjson
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.http.deps import intake_of
from app.api.http.middleware import CLIENT_GONE
from app.api.v1.detect import answer_detect, router
from app.errors import ApiError
from app.process.runtime import Runtime

logger = logging.getLogger(__name__)

PATH = "/v1/detect"
_JSON = (b"content-type", b"application/json")
_INTERNAL = orjson.dumps({"error": {"type": "internal_error", "message": "internal server error"}})


class DetectRoute:
    """Answers POST /v1/detect; everything else goes on to `app` (the router)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        # The declared route, put in the scope as the router would: the metrics label
        # requests by its path.
        self.route = next(r for r in router.routes if getattr(r, "path", None) == PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        try:
            runtime = intake_of(self.runtime)
            body = await answer_detect(runtime, Headers(scope=scope), body_chunks(receive))
        except ApiError as exc:
            headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in
                       exc.headers.items()]  # fmt: skip
            await send_json(send, exc.status_code, orjson.dumps(exc.body()), headers)
            return
        except ClientDisconnect:  # gone before its body was read: nobody to answer
            scope[CLIENT_GONE] = True
            return
        except Exception:  # not cancellation (a BaseException): that goes on up
            logger.exception("unhandled error")
            await send_json(send, 500, _INTERNAL)
            return
        await send_json(send, 200, body)


async def body_chunks(receive: Receive) -> AsyncGenerator[bytes, None]:
    """The request body's chunks, as starlette's request.stream() gives them."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON answer in two messages (what starlette's Response sends)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                _JSON,
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
