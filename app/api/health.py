"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.http.deps import RuntimeDep
from app.api.v1.protocol import Status

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=Status,
    response_model_exclude_none=True,
    summary="Liveness: 200 while the process lives",
)
async def healthz(runtime: RuntimeDep) -> Status:
    # Alive, whatever else: with --no-exit-on-load-failure the body says the model failed
    # (a liveness probe that failed would only restart into the same failure).
    failure = runtime.failure
    if failure is not None:
        return Status(status="failed", reason=failure)
    return Status(status="ok")


@router.get(
    "/readyz",
    response_model=Status,
    summary="Readiness: 200 once the model (every model loaded at start-up) is loaded and warmed",
    responses={503: {"model": Status, "description": "Loading, draining or failed."}},
)
async def readyz(runtime: RuntimeDep) -> Response:
    state = runtime.state
    body: dict[str, object] = {"status": state}
    if state == "failed" and runtime.failure is not None:
        body["reason"] = runtime.failure
    if runtime.router is not None and state != "ready":
        # Several models: ready once every model loaded at start-up is; these are not yet.
        body["models"] = runtime.router.not_ready()
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    body, content_type = runtime.metrics.exposition()
    return Response(body, media_type=content_type)
