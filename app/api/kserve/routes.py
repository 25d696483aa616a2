"""KServe Open Inference Protocol v2 (REST): the routes of health, metadata and infer.

Inference goes through the same DetectionService (batcher, limits, metrics) as /v1/detect; the
request is parsed by request.py, the answer encoded by tensors.py and binary.py, and errors
take the protocol's shape, {"error": "message"}, with the status /v1 would give (errors.py).
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.http.deps import IntakeDep, RuntimeDep
from app.api.http.request_body import collect, inflate, run_sized
from app.api.kserve import tensors
from app.api.kserve.binary import HEADER_LENGTH, encode_infer_response
from app.api.kserve.errors import KServeRoute
from app.api.kserve.protocol import (
    InferRequestHeader,
    Live,
    ModelMetadata,
    ModelReady,
    ProtocolError,
    Ready,
    ServerMetadata,
)
from app.api.kserve.request import parse_infer_request
from app.errors import InvalidImageError, InvalidRequestError, UnknownModelError
from app.process.runtime import Runtime
from app.service import DetectionService, ImageSource

router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=KServeRoute)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "Malformed request or bad image; the message names the input or image.",
        404: "Unknown model or version.",
        413: "Body or image too large.",
        429: "Queue full; see Retry-After.",
        500: "Inference failed for this batch.",
        503: "The model is loading or the server is shutting down.",
        504: "The request passed its deadline.",
    }
    return {c: {"model": ProtocolError, "description": described[c]} for c in codes}


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_errors(404),
    503: {"model": ModelReady, "description": "Loading, draining or failed."},
}


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its local $defs substituted, so it stands alone inside the OpenAPI
    document (pydantic's refs point at a $defs section the document does not have)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "Inference request JSON; with the binary tensor data extension it is "
        f"followed by the raw tensors and its length is in the {HEADER_LENGTH} header.",
        "content": {
            "application/json": {"schema": _inline(InferRequestHeader.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return tensors.server_metadata(request.app.version)


@router.get("/health/live", response_model=Live, summary="Liveness: 200 while the process lives")
async def live() -> Live:
    return Live(live=True)


@router.get(
    "/health/ready",
    response_model=Ready,
    summary="Readiness: 200 once the model is loaded and warmed",
    responses={503: {"model": Ready, "description": "Loading, draining or failed."}},
)
async def ready(runtime: RuntimeDep) -> Response:
    is_ready = runtime.state == "ready"
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadata,
    summary="Model metadata: input, outputs (names, datatypes, shapes) and parameters",
    responses=_errors(404, 503),
)
async def model_metadata(model_name: str, runtime: RuntimeDep) -> dict[str, Any]:
    return _model_metadata(runtime.service_for(model_name), model_name, None)


@router.get(
    "/models/{model_name}/versions/{version}",
    response_model=ModelMetadata,
    summary="Model metadata of one version",
    responses=_errors(404, 503),
)
async def model_version_metadata(
    model_name: str, version: str, runtime: RuntimeDep
) -> dict[str, Any]:
    return _model_metadata(runtime.service_for(model_name), model_name, version)


@router.get(
    "/models/{model_name}/ready",
    response_model=ModelReady,
    summary="Model readiness: 200 once the model is loaded and warmed",
    responses=_READY_RESPONSES,
)
async def model_ready(model_name: str, runtime: RuntimeDep) -> Response:
    return _model_ready(runtime, model_name, None)


@router.get(
    "/models/{model_name}/versions/{version}/ready",
    response_model=ModelReady,
    summary="Readiness of one model version",
    responses=_READY_RESPONSES,
)
async def model_version_ready(model_name: str, version: str, runtime: RuntimeDep) -> Response:
    return _model_ready(runtime, model_name, version)


@router.post(
    "/models/{model_name}/infer",
    summary="Detect objects in a BYTES tensor of encoded images",
    response_class=Response,
    responses=_errors(400, 404, 413, 429, 500, 503, 504),
    openapi_extra=_INFER_BODY,
)
async def infer(model_name: str, request: Request, runtime: IntakeDep) -> Response:
    return await _infer(request, await runtime.inference_service(model_name), model_name, None)


@router.post(
    "/models/{model_name}/versions/{version}/infer",
    summary="Detect objects with one model version",
    response_class=Response,
    responses=_errors(400, 404, 413, 429, 500, 503, 504),
    openapi_extra=_INFER_BODY,
)
async def infer_version(
    model_name: str, version: str, request: Request, runtime: IntakeDep
) -> Response:
    return await _infer(request, await runtime.inference_service(model_name), model_name, version)


def _model_metadata(service: DetectionService, name: str, version: str | None) -> dict[str, Any]:
    info = service.info
    tensors.check_model(info.name, name, version)
    return tensors.model_metadata(
        name=info.name,
        backend=info.backend,
        labels=info.labels,
        default_threshold=service.settings.default_threshold,
        default_max_detections=service.settings.default_max_detections,
    )


def _model_ready(runtime: Runtime, name: str, version: str | None) -> Response:
    if runtime.router is not None:
        if name not in runtime.router.models:
            raise UnknownModelError(
                f"unknown model {name!r}; the models are: {runtime.router.known()}"
            )
        tensors.check_model(name, name, version)
        is_ready = runtime.router.state(name)[0] == "ready" and not runtime.draining
        return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)
    served = runtime.service.info.name if runtime.service else runtime.settings.served_model_name
    tensors.check_model(served, name, version)
    is_ready = runtime.state == "ready"
    return JSONResponse({"name": served, "ready": is_ready}, status_code=200 if is_ready else 503)


async def _infer(
    request: Request, service: DetectionService, name: str, version: str | None
) -> Response:
    tensors.check_model(service.info.name, name, version)
    settings = service.settings
    raw = await collect(request.stream())
    body: bytes | bytearray = raw
    encoding = request.headers.get("content-encoding")
    if encoding is not None:
        # zlib releases the GIL while it inflates: on a thread the event loop runs meanwhile.
        body = await to_thread.run_sync(
            lambda: inflate(
                raw,
                encoding,
                max_bytes=min(settings.max_inflated_bytes, settings.max_upload_bytes),
                max_ratio=settings.max_inflation_ratio,
            )
        )
    length_header = request.headers.get(HEADER_LENGTH)
    parsed = await run_sized(
        len(body),
        lambda: parse_infer_request(body, length_header, settings.max_images_per_request),
    )
    try:
        result = await service.detect([ImageSource(raw=b) for b in parsed.images], parsed.options)
    except InvalidImageError as exc:
        if not parsed.images_from_json:
            raise
        raise InvalidRequestError(
            f"{exc.message} (an image sent as a JSON string must be base64 text, or an image "
            "whose bytes are all UTF-8; or send it with the binary tensor data extension)"
        ) from None
    k = parsed.options.max_detections or service.settings.default_max_detections
    content, header_length = encode_infer_response(
        model_name=service.info.name,
        request_id=parsed.id,
        tensors=tensors.v2_tensors(result, k),
        outputs=parsed.outputs,
    )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )
