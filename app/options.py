"""What a caller may ask of one detection, whichever door it came through (/v1 JSON or form
fields, v2 request parameters, jobs): threshold, max_detections, classes, drawing, tiling. The
service reads these; the protocols validate into them (/v1's DetectRequest extends
DetectOptions), so they live beside the service, not under app/api/."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from app.errors import describe_error
from app.tile_geometry import MAX_OVERLAP, MAX_TILE_SIZE, MIN_TILE_SIZE


class TilingOptions(BaseModel):
    """Tiled (sliced) inference, SAHI's semantics; unset fields take the server's defaults
    (DETR_SERVE_TILING_*). Strict: JSON's own types only (a multipart field or a v2 parameter
    carries the object as JSON text, parsed first), as the OpenAPI schema documents them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    auto: bool | None = Field(
        default=None,
        description="true: tile only images whose longer side is over tiling_auto_factor "
        "times the model's input (smaller ones run whole).",
    )
    tile_size: int | None = Field(
        default=None,
        ge=MIN_TILE_SIZE,
        le=MAX_TILE_SIZE,
        description="Tile side in the image's pixels (default: the model's input side).",
    )
    overlap: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_OVERLAP,
        description="Share of a tile its neighbour overlaps; tiles step by "
        "tile_size - int(tile_size * overlap).",
    )
    full_image: bool | None = Field(
        default=None, description="Also run the whole image, resized, and merge its boxes."
    )
    merge: Literal["nms", "greedy_nmm"] | None = Field(
        default=None,
        description="nms keeps the best of matching boxes; greedy_nmm merges them into the "
        "union box, with the best box's score and class.",
    )
    match_metric: Literal["iou", "ios"] | None = Field(
        default=None,
        description="iou: intersection over union; ios: intersection over the smaller box.",
    )
    match_threshold: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Boxes match at this metric value or above."
    )
    class_agnostic: bool | None = Field(
        default=None, description="Merge boxes of different classes too."
    )


def tiling_value(value: Any) -> TilingOptions | None:
    """The `tiling` option as given (true, false, "auto", an object, or from a form field or a
    v2 parameter the same as text) -> TilingOptions or None; ValueError naming the field."""
    if isinstance(value, str):
        text = value.strip()
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            value = True
        elif lowered in ("false", "0", "no", "off", ""):
            value = False
        elif lowered == "auto":
            value = "auto"
        elif text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError("tiling: the object is not valid JSON") from None
    if value is None or value is False:
        return None
    if value is True:
        return TilingOptions()
    if value == "auto":
        return TilingOptions(auto=True)
    if isinstance(value, TilingOptions):
        return value
    if isinstance(value, dict):
        try:
            return TilingOptions.model_validate(value)
        except ValidationError as exc:
            raise ValueError(describe_error(exc.errors()[0], prefix="tiling.")) from None
    raise ValueError(
        f'tiling must be true, false, "auto" or an object of tiling options, got {value!r}'
    )


class DetectOptions(BaseModel):
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Minimum score (default: the server's)."
    )
    max_detections: int | None = Field(
        default=None, ge=1, le=1000, description="Most detections per image, best first."
    )
    classes: list[str | int] | None = Field(
        default=None,
        max_length=1000,
        description="Only these classes, by label name or class id.",
    )
    render: bool = Field(
        default=False,
        description="Add each image with its boxes drawn, as base64 JPEG in `image` "
        "(POST /v1/render answers the image itself).",
    )
    labels: bool = Field(
        default=True, description="When drawing: a label with class name and score per box."
    )
    tiling: TilingOptions | bool | Literal["auto"] | None = Field(
        default=None,
        description='Tiled inference for large images: true (server defaults), "auto" (only '
        "images over tiling_auto_factor times the model's input), or an object of options.",
    )

    @field_validator("tiling", mode="before")
    @classmethod
    def _tiling(cls, value: Any) -> TilingOptions | None:
        try:
            return tiling_value(value)
        except ValueError as exc:
            raise PydanticCustomError("tiling", "{reason}", {"reason": str(exc)}) from None

    @property
    def tiling_options(self) -> TilingOptions | None:
        return self.tiling if isinstance(self.tiling, TilingOptions) else None
