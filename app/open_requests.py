"""The inference requests a front end has open: counted (the drain waits for them), and
cancelled when their client goes away (its queued images leave the engine's queue).

Neither Starlette nor uvicorn cancels a handler whose client has disconnected: uvicorn only
reports it as an `http.disconnect` message to whoever calls receive() once the body is read.
Written by hand for that reason: after the last body message, a watcher waits on receive();
`http.disconnect` before the response has started cancels the handler (the engine client then
sends "cancel" for its queued images; app/ipc/client.py). An image already inside a running
forward pass finishes there; its answer is dropped.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware import CLIENT_GONE
from app.runtime import Runtime

logger = logging.getLogger(__name__)


class OpenRequestsMiddleware:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Inference is POST (/v1/detect, /v2/.../infer); the rest answers at once.
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        response_started = False

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def send_answer(message: Message) -> None:
            nonlocal response_started
            response_started = True
            await send(message)

        async def client_gone() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass

        self.runtime.request_started()

        async def answer() -> None:
            await self.app(scope, receive_body, send_answer)

        handler = asyncio.create_task(answer())
        watcher = asyncio.create_task(client_gone())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not response_started:
                scope[CLIENT_GONE] = True
                handler.cancel()
                logger.info("the client went away: its request is cancelled")
                await asyncio.wait((handler,))
                return
            await handler
        finally:
            for task in (handler, watcher):
                task.cancel()
            self.runtime.request_finished()
