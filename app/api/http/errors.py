"""The JSON error answers of the app: typed errors (app/errors.py), request validation, HTTP
errors (404, 405 with every method of the path) and the unexpected 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.errors import ApiError, describe_validation

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app does not answer itself, as {"error": {"type", "message"}} with its
    status (the v2 routes answer theirs in the protocol's shape: app/api/kserve/errors.py)."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        body = {"error": {"type": "validation_error", "message": describe_validation(exc.errors())}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"type": kind, "message": str(exc.detail)}}
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the first route of the path only; a path served by several routes
            # (GET and DELETE /v1/jobs/{id}) allows what they all do.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request))}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        body = {"error": {"type": "internal_error", "message": "internal server error"}}
        return JSONResponse(body, status_code=500)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods the API documents for the request's path (every route of that path)."""
    methods: set[str] = set()
    for path, operations in app.openapi().get("paths", {}).items():
        if compile_path(path)[0].match(request.url.path):
            methods |= {m.upper() for m in operations if m != "parameters"}
    return sorted(methods)
