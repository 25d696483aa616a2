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

from app.api.http.middleware import CLIENT_GONE
from app.process.runtime import Runtime

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
        # The handler runs in this task; one watcher task, started once the body is read,
        # cancels it when the client goes.
        handler = asyncio.current_task()
        assert handler is not None
        watcher: asyncio.Task[None] | None = None
        response_started = False
        gone = False

        async def client_gone() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not response_started:
                gone = True
                handler.cancel()

        async def receive_body() -> Message:
            nonlocal watcher
            message = await receive()
            if watcher is None and (
                message["type"] != "http.request" or not message.get("more_body", False)
            ):
                watcher = asyncio.get_running_loop().create_task(client_gone())
            return message

        async def send_answer(message: Message) -> None:
            nonlocal response_started
            response_started = True
            await send(message)

        self.runtime.request_started()
        try:
            await self.app(scope, receive_body, send_answer)
        except asyncio.CancelledError:
            if not gone:
                raise
            handler.uncancel()
            scope[CLIENT_GONE] = True
            logger.info("the client went away: its request is cancelled")
        finally:
            if watcher is not None:
                watcher.cancel()
            if gone and handler.cancelling():  # a cancel the handler caught and ended on
                handler.uncancel()
                scope[CLIENT_GONE] = True
            self.runtime.request_finished()
