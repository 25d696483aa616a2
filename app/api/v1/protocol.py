"""Request and response models of the /v1 API (the OpenAPI document is built from these)."""

from __future__ import annotations

from functools import cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from app.options import DetectOptions

# An 8x8 red PNG: small enough for the docs, real enough that "Try it out" works.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtBIA0MoBFD5jqJkAAAAA"
    "SUVORK5CYII="
)


class ImageInput(BaseModel):
    # oneOf states in the schema what the validator below enforces.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["url"]}, {"required": ["data"]}]},
    )

    url: str | None = Field(
        default=None,
        max_length=4096,
        description="http(s) URL of the image; fetched by the server.",
    )
    data: str | None = Field(
        default=None,
        description="The encoded image (JPEG, PNG, WebP, BMP, GIF, TIFF) in base64; "
        "a data: URI prefix is accepted.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageInput:
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of 'url' or 'data' for each image")
        return self


class DetectRequest(DetectOptions):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": [{"data": EXAMPLE_PNG_BASE64}], "threshold": 0.5, "max_detections": 10},
                {"images": [{"url": "https://example.com/shapes.jpg"}], "classes": ["circle"]},
            ]
        },
    )

    images: list[ImageInput] = Field(min_length=1, description="The images, answered in order.")
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The model to run, by name (GET /v1/models); default: the server's default "
        "model.",
    )


class RenderRequest(DetectRequest):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": [{"data": EXAMPLE_PNG_BASE64}], "threshold": 0.5, "format": "png"}
            ]
        },
    )

    images: list[ImageInput] = Field(
        min_length=1, max_length=1, description="The one image to draw on."
    )
    format: Literal["jpeg", "png"] | None = Field(
        default=None,
        description="The answer's format (default: PNG when Accept names image/png and not "
        "image/jpeg, else JPEG).",
    )


@cache
def detect_request_model(max_images: int) -> type[DetectRequest]:
    """DetectRequest with `images` bounded by the server's max_images_per_request: validation
    stops at the limit, and the OpenAPI document states it (maxItems)."""
    model: type[DetectRequest] = create_model(
        "DetectRequest",
        __base__=DetectRequest,
        images=(
            list[ImageInput],
            Field(
                min_length=1,
                max_length=max_images,
                description="The images, answered in order.",
            ),
        ),
    )
    return model


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: list[float] = Field(
        min_length=4, max_length=4, description="[x1, y1, x2, y2] in the original image's pixels."
    )


class Timings(BaseModel):
    fetch_ms: float = Field(description="Download (URL inputs) or base64 decode.")
    decode_ms: float
    queue_ms: float
    inference_ms: float = Field(description="Pre-processing and forward pass of the whole batch.")
    postprocess_ms: float
    batch_size: int
    render_ms: float | None = Field(
        default=None, description="Drawing the boxes on the full-size image (with render)."
    )
    tiles: int | None = Field(
        default=None,
        description="Tiled images only: forward-pass items the image ran as (tiles, plus the "
        "full-image pass).",
    )


class ImageResult(BaseModel):
    width: int
    height: int
    detections: list[Detection]
    timings: Timings
    image: str | None = Field(
        default=None, description="With render: the image with its boxes drawn, base64 JPEG."
    )


class DetectResponse(BaseModel):
    model: str
    results: list[ImageResult]


class ErrorDetail(BaseModel):
    type: str
    message: str
    image_index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BucketCard(BaseModel):
    """How batches of one size run on one device."""

    device: str
    batch_size: int
    cuda_graph: bool = Field(description="true: a captured CUDA graph is replayed")
    reason: str = Field("", description="why this bucket runs eagerly; empty for a graph")


class ModelCard(BaseModel):
    name: str
    state: Literal["loading", "ready", "failed", "unloaded", "stuck", "restarting"] = Field(
        default="ready",
        description="loading, ready, failed (see reason), unloaded; stuck or restarting while "
        "its engine is in trouble. Backend, device and labels are known once it is ready.",
    )
    reason: str = Field(default="", description="with state failed: why the model did not load")
    default: bool = Field(default=True, description="answers requests that name no model")
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    backend_reason: str = Field(
        default="", description="why this backend serves (--backend auto's choice, fallbacks)"
    )
    architecture: str | None = None
    labels: dict[int, str] = Field(default_factory=dict)
    max_batch_size: int | None = None
    buckets: list[BucketCard] = Field(
        default_factory=list,
        description="per device and batch-size bucket: CUDA graph or eager, and why",
    )


class ModelList(BaseModel):
    models: list[ModelCard]


class Status(BaseModel):
    status: str
    reason: str | None = Field(
        default=None, description="With status failed: the model folder and why it failed."
    )
