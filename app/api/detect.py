"""POST /v1/detect: JSON (URLs or base64) or multipart uploads in, boxes out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.api.deps import ServiceDep
from app.encode import v1_json
from app.errors import ApiError, InvalidRequestError, ValidationFailedError
from app.request_body import collect, parse_json, run_sized
from app.schemas import DetectOptions, DetectResponse, ErrorResponse, detect_request_model
from app.service import ImageSource

router = APIRouter(tags=["detection"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input: the message names the image."},
    413: {"model": ErrorResponse, "description": "Body or image too large."},
    415: {"model": ErrorResponse, "description": "Neither JSON nor multipart/form-data."},
    422: {"model": ErrorResponse, "description": "The request does not match the schema."},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After."},
    500: {"model": ErrorResponse, "description": "Inference failed for this batch."},
    503: {"model": ErrorResponse, "description": "Loading or shutting down."},
    504: {"model": ErrorResponse, "description": "The request passed its deadline."},
}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "One or more images, as repeated 'file' parts.",
        },
        "threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "max_detections": {"type": "integer", "minimum": 1, "maximum": 1000},
        "classes": {
            "type": "string",
            "description": "Comma-separated class names or ids (the field may also repeat).",
        },
        "tiling": {
            "type": "string",
            "description": "Tiled inference: true, auto, or the options object as JSON text "
            '(e.g. {"tile_size": 320, "overlap": 0.2}).',
        },
    },
}

OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/DetectRequest"}},
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
        },
    }
}


class UnsupportedMediaTypeError(InvalidRequestError):
    status_code = 415
    error_type = "unsupported_media_type"


@router.post(
    "/v1/detect",
    response_model=DetectResponse,
    summary="Detect objects in one or more images",
    description='Send JSON `{"images": [{"url": ...} | {"data": base64}], ...}` or '
    "multipart/form-data with one or more `file` parts. Results come in input order, boxes "
    "as [x1, y1, x2, y2] in each original image's pixels.",
    responses=_ERRORS,
    openapi_extra=OPENAPI_BODY,
)
async def detect(request: Request, service: ServiceDep) -> Response:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding[:40]!r} is not accepted here: send the body as it is"
        )
    if content_type == "application/json":
        sources, options = await _from_json(request, service.settings.max_images_per_request)
    elif content_type == "multipart/form-data":
        sources, options = await _from_multipart(request, service.settings.max_images_per_request)
    else:
        raise UnsupportedMediaTypeError(
            "send application/json or multipart/form-data (got "
            f"{content_type or 'no content type'})"
        )
    result = await service.detect(sources, options)
    # Encoded from the arrays (app/encode.py); response_model above documents the shape.
    return Response(v1_json(result, service.info.labels), media_type="application/json")


async def _from_json(request: Request, max_images: int) -> tuple[list[ImageSource], DetectOptions]:
    body = await collect(request.stream())
    # Counted before it is parsed, parsed before it is validated, validated up to the image
    # limit only (see app/request_body.py): a dense body costs milliseconds, not seconds.
    value = await run_sized(len(body), lambda: parse_json(body, "the body"))
    try:
        parsed = detect_request_model(max_images).model_validate(value, strict=True)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "too_long" and err["loc"] == ("images",):
                raise InvalidRequestError(
                    f"the request holds {err['ctx']['actual_length']} images, over the limit "
                    f"of {max_images}"
                ) from None
        raise ValidationFailedError(_describe(exc)) from None
    sources = [ImageSource(url=i.url, base64=i.data) for i in parsed.images]
    return sources, parsed


async def _from_multipart(
    request: Request, max_files: int
) -> tuple[list[ImageSource], DetectOptions]:
    try:
        form = await request.form(max_files=max_files + 1, max_fields=32)
    except ApiError:
        raise
    except Exception as exc:  # starlette raises MultiPartException / HTTPException on bad bodies
        raise InvalidRequestError(f"the multipart body cannot be parsed: {exc}") from None
    sources = []
    for part in form.getlist("file"):
        if not isinstance(part, UploadFile):
            raise InvalidRequestError("each 'file' part must be a file upload")
        sources.append(ImageSource(raw=await part.read()))
    if not sources:
        raise InvalidRequestError("the multipart body holds no 'file' part")
    classes: list[str | int] | None = None
    raw_classes = [str(v) for v in form.getlist("classes")]
    if raw_classes:
        classes = [c.strip() for v in raw_classes for c in v.split(",") if c.strip()]
    try:
        options = DetectOptions.model_validate(
            {
                "threshold": form.get("threshold") or None,
                "max_detections": form.get("max_detections") or None,
                "classes": classes,
                "tiling": form.get("tiling") or None,
            }
        )
    except ValidationError as exc:
        raise ValidationFailedError(_describe(exc)) from None
    return sources, options


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
