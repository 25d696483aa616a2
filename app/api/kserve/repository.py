"""Triton's model repository extension over HTTP: POST /v2/repository/index,
/v2/repository/models/{name}/load and /unload, as stock `tritonclient.http` calls them
(`get_model_repository_index`, `load_model`, `unload_model`).

Thin: the front end forwards each call to the supervisor's ModelManager (app/models/manager.py)
over the control socket and answers in the protocol's shape ({"error": "..."} on failure).
load and unload need --model-control explicit (403 otherwise, as Triton refuses them outside
its explicit mode); the index is always served. All three need the API key when one is set.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.api.http.deps import RuntimeDep
from app.api.http.request_body import collect, parse_json
from app.api.kserve.errors import KServeRoute
from app.api.kserve.protocol import IndexEntry, IndexRequest, LoadRequest, ProtocolError
from app.errors import ApiError, InvalidRequestError, describe_validation
from app.models.manager import ModelView
from app.process.runtime import Runtime

router = APIRouter(prefix="/v2/repository", tags=["kserve-v2"], route_class=KServeRoute)

_MAX_BODY = 64 * 1024
# Triton's index states. A model that is not loaded is UNAVAILABLE, with the reason.
_STATES = {"ready": "READY", "loading": "LOADING"}


class ControlOffError(ApiError):
    status_code = 403
    error_type = "forbidden"


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolError, "description": "Bad body, or the model failed to load."},
    403: {"model": ProtocolError, "description": "Model control is off (--model-control)."},
    404: {"model": ProtocolError, "description": "The repository holds no such model."},
    503: {"model": ProtocolError, "description": "Shutting down."},
}


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await collect(request.stream())
    if len(raw) > _MAX_BODY:
        raise InvalidRequestError(f"the body is over {_MAX_BODY} bytes")
    if not raw.strip():
        return model()
    try:
        return model.model_validate(parse_json(bytes(raw), "the body"), strict=True)
    except ValidationError as exc:
        raise InvalidRequestError(describe_validation(exc.errors())) from None


def _entry(runtime: Runtime, view: ModelView) -> IndexEntry:
    state, reason = view.state, view.reason
    if runtime.router is not None and view.name in runtime.router.models:
        state, reason = runtime.router.state(view.name)
    if state == "unloaded" and not reason:
        reason = "unloaded"
    return IndexEntry(name=view.name, state=_STATES.get(state, "UNAVAILABLE"), reason=reason)


def _controlled(runtime: Runtime) -> None:
    if runtime.router is None:
        raise ControlOffError(
            "this server serves one model, fixed at start-up: start detr-serve with "
            "--model-repository DIR (or --model given more than once) and --model-control "
            "explicit to load and unload models"
        )
    if runtime.settings.model_control != "explicit":
        raise ControlOffError(
            "model control is off: start detr-serve with --model-control explicit "
            "(DETR_SERVE_MODEL_CONTROL=explicit) to load and unload models at run time"
        )


async def index_entries(runtime: Runtime, ready_only: bool) -> list[IndexEntry]:
    """The index, for HTTP and gRPC alike."""
    if runtime.router is None:
        state = runtime.state
        service = runtime.service
        entries = [
            IndexEntry(
                name=service.info.name if service else runtime.settings.served_model_name,
                state="READY" if state == "ready" else "UNAVAILABLE",
                reason="" if state == "ready" else (runtime.failure or state),
            )
        ]
    else:
        views = await runtime.router.control("index")
        entries = [_entry(runtime, v) for v in views]
    return [e for e in entries if e.state == "READY"] if ready_only else entries


async def load_model(runtime: Runtime, name: str, parameters: Collection[str]) -> None:
    """Load (or swap in again) `name`; returns once this front end routes to it."""
    _controlled(runtime)
    if parameters:
        raise InvalidRequestError(
            f"load parameters are not taken ({', '.join(sorted(parameters))}): a model's "
            "settings come from the serve.json in its folder; edit it and load again"
        )
    assert runtime.router is not None
    view = await runtime.router.control("load", name)
    await runtime.router.settled(view)


async def unload_model(runtime: Runtime, name: str, parameters: Collection[str]) -> None:
    _controlled(runtime)
    unknown = set(parameters) - {"unload_dependents"}
    if unknown:
        raise InvalidRequestError(f"unknown unload parameters: {', '.join(sorted(unknown))}")
    assert runtime.router is not None
    await runtime.router.control("unload", name)


@router.post(
    "/index",
    response_model=list[IndexEntry],
    summary="Every model of the repository, loaded or not, with its state",
    responses=_ERRORS,
)
async def repository_index(request: Request, runtime: RuntimeDep) -> Response:
    options = await _body(request, IndexRequest)
    entries = await index_entries(runtime, options.ready)
    return JSONResponse([e.model_dump() for e in entries])


@router.post(
    "/models/{model_name}/load",
    summary="Load a model, or load it again (its requests in flight finish on the old one)",
    responses=_ERRORS,
)
async def repository_load(model_name: str, request: Request, runtime: RuntimeDep) -> Response:
    body = await _body(request, LoadRequest)
    await load_model(runtime, model_name, body.parameters)
    return JSONResponse({})


@router.post(
    "/models/{model_name}/unload",
    summary="Unload a model (its requests in flight finish first)",
    responses=_ERRORS,
)
async def repository_unload(model_name: str, request: Request, runtime: RuntimeDep) -> Response:
    body = await _body(request, LoadRequest)
    await unload_model(runtime, model_name, body.parameters)
    return JSONResponse({})
