"""POST /v1/render: one image in (as for /v1/detect), the image with its boxes drawn out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.api.http.deps import IntakeDep
from app.api.v1.detect import ERRORS, multipart_schema, read_request
from app.api.v1.protocol import RenderRequest
from app.images.render import MEDIA_TYPES
from app.service import RenderSpec

router = APIRouter(tags=["detection"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}

_MULTIPART_SCHEMA = multipart_schema(
    files_description="The image, as one 'file' part.",
    max_files=1,
    extra={
        "labels": {"type": "boolean", "description": "Label each box (class and score)."},
        "format": {"type": "string", "enum": ["jpeg", "png"]},
    },
)


@router.post(
    "/v1/render",
    summary="Draw the detections on one image",
    description="The same inputs and options as /v1/detect, for one image (one `file` part, "
    "or JSON with one entry in `images`). Answers the image at its own resolution, EXIF "
    "orientation applied, with a box per detection in its class's colour and, unless "
    '`"labels": false`, the class name and score. JPEG, or PNG with `"format": "png"` or '
    "`Accept: image/png`.",
    response_class=Response,
    responses={
        200: {
            "description": "The image with its boxes drawn.",
            "content": {"image/jpeg": _BINARY, "image/png": _BINARY},
        },
        **ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/RenderRequest"}},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def render(request: Request, runtime: IntakeDep) -> Response:
    sources, options = await read_request(
        request.headers, request.stream(), RenderRequest, max_images=1
    )
    service = await runtime.inference_service(options.model)
    fmt = options.format or _format_from_accept(request.headers.get("accept", ""))
    result = await service.detect(sources, options, RenderSpec(fmt, options.labels))
    image = result.images[0]
    assert image.rendered is not None
    headers = {"X-Detections": str(len(image.detections.scores))}
    return Response(image.rendered, media_type=MEDIA_TYPES[fmt], headers=headers)


def _format_from_accept(accept: str) -> str:
    """PNG when the client accepts PNG and not JPEG; JPEG otherwise (also for */*)."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return "png" if "image/png" in types and "image/jpeg" not in types else "jpeg"


def openapi_components() -> dict[str, Any]:
    """RenderRequest's schema for the OpenAPI document (the route reads its body by hand)."""
    return RenderRequest.model_json_schema(ref_template="#/components/schemas/{model}")
