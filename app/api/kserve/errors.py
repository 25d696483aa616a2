"""Errors of the v2 REST routes in the protocol's shape, {"error": "message"}, which
tritonclient reads, with the status /v1 would give."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.kserve.protocol import error_body
from app.errors import ApiError, describe_validation

logger = logging.getLogger(__name__)


class KServeRoute(APIRoute):
    """Answers every error of these routes in the protocol's shape, which tritonclient reads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                status, message, headers = exc.status_code, exc.message, exc.headers
            except RequestValidationError as exc:
                status, message, headers = 400, describe_validation(exc.errors()), {}
            except StarletteHTTPException as exc:
                status, message, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
            except Exception:
                logger.exception("unhandled error")
                status, message, headers = 500, "internal server error", {}
            return JSONResponse(error_body(message), status_code=status, headers=headers)

        return protocol_errors
