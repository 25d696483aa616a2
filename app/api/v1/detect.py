"""POST /v1/detect: JSON (URLs or base64) or multipart uploads in, boxes out."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from app.api.http.deps import IntakeDep
from app.api.http.request_body import collect, parse_json, run_sized
from app.api.v1.encode import v1_json
from app.api.v1.protocol import DetectRequest, DetectResponse, ErrorResponse, detect_request_model
from app.errors import (
    ApiError,
    InvalidRequestError,
    ValidationFailedError,
    describe_validation,
)
from app.process.runtime import Runtime
from app.service import ImageSource, RenderSpec

_Request = TypeVar("_Request", bound=DetectRequest)

router = APIRouter(tags=["detection"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input: the message names the image."},
    404: {"model": ErrorResponse, "description": "Unknown model: the message names the known."},
    413: {"model": ErrorResponse, "description": "Body or image too large."},
    415: {"model": ErrorResponse, "description": "Neither JSON nor multipart/form-data."},
    422: {"model": ErrorResponse, "description": "The request does not match the schema."},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After."},
    500: {"model": ErrorResponse, "description": "Inference failed for this batch."},
    503: {"model": ErrorResponse, "description": "Loading or shutting down."},
    504: {"model": ErrorResponse, "description": "The request passed its deadline."},
}


def multipart_schema(
    files_description: str, max_files: int | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """The multipart/form-data body's schema: the 'file' parts, the options as fields."""
    files: dict[str, Any] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "description": files_description,
    }
    if max_files is not None:
        files["maxItems"] = max_files
    return {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": files,
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
            "model": {"type": "string", "description": "The model to run (default: the default)."},
            **extra,
        },
    }


_MULTIPART_SCHEMA = multipart_schema(
    "One or more images, as repeated 'file' parts.",
    None,
    {
        "render": {"type": "boolean", "description": "Add each image with its boxes drawn."},
        "labels": {"type": "boolean", "description": "When drawing: label each box."},
    },
)

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
    responses=ERRORS,
    openapi_extra=OPENAPI_BODY,
)
async def detect(request: Request, runtime: IntakeDep) -> Response:
    # Served by app/api/v1/detect_asgi.py in front of the router (same contract, less work per
    # request); this declaration documents the route and serves an app built without it.
    body = await answer_detect(runtime, request.headers, request.stream())
    return Response(body, media_type="application/json")


async def answer_detect(
    runtime: Runtime, headers: Headers, chunks: AsyncGenerator[bytes, None]
) -> bytes:
    """One /v1/detect request, body to answer: the one place its parsing happens (a new
    request field goes into DetectRequest, and its form field into _FORM_OPTIONS). The caller
    has passed the door (app/api/http/deps.py, `intake_of`); the body names the model."""
    max_images = runtime.settings.max_images_per_request
    sources, options = await read_request(
        headers, chunks, detect_request_model(max_images), max_images
    )
    service = await runtime.inference_service(options.model)
    render = RenderSpec("jpeg", options.labels) if options.render else None
    result = await service.detect(sources, options, render)
    # Encoded from the arrays (app/api/v1/encode.py); response_model above documents the shape.
    return v1_json(result, service.info.labels)


async def read_request(
    headers: Headers, chunks: AsyncGenerator[bytes, None], model: type[_Request], max_images: int
) -> tuple[list[ImageSource], _Request]:
    """The images and options of a JSON or multipart body (its `chunks`: starlette's
    request.stream(), or app/api/v1/detect_asgi.py's), validated as `model`."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {encoding[:40]!r} is not accepted here: send the body as it is"
        )
    if content_type == "application/json":
        return await _from_json(chunks, model, max_images)
    if content_type == "multipart/form-data":
        return await _from_multipart(headers, chunks, model, max_images)
    raise UnsupportedMediaTypeError(
        f"send application/json or multipart/form-data (got {content_type or 'no content type'})"
    )


async def _from_json(
    chunks: AsyncGenerator[bytes, None], model: type[_Request], max_images: int
) -> tuple[list[ImageSource], _Request]:
    body = await collect(chunks)
    # Counted before it is parsed, parsed before it is validated, validated up to the image
    # limit only (see app/api/http/request_body.py): a dense body costs milliseconds, not seconds.
    value = await run_sized(len(body), lambda: parse_json(body, "the body"))
    try:
        parsed = model.model_validate(value, strict=True)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] == "too_long" and err["loc"] == ("images",):
                raise InvalidRequestError(
                    f"the request holds {err['ctx']['actual_length']} images, over the limit "
                    f"of {max_images}"
                ) from None
        raise ValidationFailedError(describe_validation(exc.errors())) from None
    sources = [ImageSource(url=i.url, base64=i.data) for i in parsed.images]
    return sources, parsed


# Options a multipart body may carry as form fields (besides 'classes' and the files).
_FORM_OPTIONS = ("threshold", "max_detections", "tiling", "render", "labels", "format", "model")


async def _from_multipart(
    headers: Headers, chunks: AsyncGenerator[bytes, None], model: type[_Request], max_files: int
) -> tuple[list[ImageSource], _Request]:
    try:
        # What starlette's request.form() does, without a Request.
        parser = MultiPartParser(headers, chunks, max_files=max_files + 1, max_fields=32)
        form = await parser.parse()
    except ApiError:
        raise
    except Exception as exc:  # starlette raises MultiPartException / HTTPException on bad bodies
        raise InvalidRequestError(f"the multipart body cannot be parsed: {exc}") from None
    sources = []
    try:
        for part in form.getlist("file"):
            if not isinstance(part, UploadFile):
                raise InvalidRequestError("each 'file' part must be a file upload")
            sources.append(ImageSource(raw=await part.read()))
    finally:
        await form.close()  # parts over 1 MB spill to temporary files
    if not sources:
        raise InvalidRequestError("the multipart body holds no 'file' part")
    if len(sources) > max_files:
        raise InvalidRequestError(
            f"the request holds {len(sources)} images, over the limit of {max_files}"
        )
    classes: list[str | int] | None = None
    raw_classes = [str(v) for v in form.getlist("classes")]
    if raw_classes:
        classes = [c.strip() for v in raw_classes for c in v.split(",") if c.strip()]
    fields: dict[str, Any] = {"classes": classes}
    for name in _FORM_OPTIONS:
        value = form.get(name)
        if value is not None and value != "" and name in model.model_fields:
            fields[name] = value
    try:
        # Validated without the images (they are the file parts), in lax mode: form fields
        # are text ("0.5", "true").
        options = model.model_validate({**fields, "images": [{"data": ""}]})
    except ValidationError as exc:
        raise ValidationFailedError(describe_validation(exc.errors())) from None
    return sources, options
