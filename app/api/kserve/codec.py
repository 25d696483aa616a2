"""KServe Open Inference Protocol v2 (REST) for the detector: request parsing, tensor encoding.

No web framework here: bytes and dicts in, bytes and dicts out, so every rule is unit-tested
without a server. The router (app/api/kserve/routes.py) only moves bytes between HTTP and these
functions.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.http.request_body import check_value_count, loads, parse_count
from app.api.v1.protocol import DetectOptions
from app.errors import ApiError, InvalidRequestError, ValidationFailedError
from app.images.structure import has_image_signature

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
MODEL_VERSION = "1"
INPUT_NAME = "images"

# Request parameters that tritonclient and Triton reserve: accepted and ignored here (the
# server's own deadline and batcher apply), so that stock clients work unchanged.
_RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "content_type",
    }
)
_OPTION_PARAMETERS = ("threshold", "max_detections", "classes", "tiling")
_UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "classification")
_LENGTH_PREFIX = struct.Struct("<I")


class UnknownModelError(ApiError):
    status_code = 404
    error_type = "not_found"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype, little-endian, as the binary extension sends it
    description: str


INPUT = TensorSpec(
    INPUT_NAME,
    "BYTES",
    (-1,),
    "object",
    "Encoded images (JPEG, PNG, WebP, BMP, GIF, TIFF), one element per image; shape [N] "
    "(or [N, 1]). Send them with the binary tensor data extension, or over JSON as base64 "
    "text: an element that does not start like an image and is valid base64 is decoded "
    "(JSON strings are UTF-8 text, which encoded images almost never are).",
)
OUTPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec(
            "boxes",
            "FP32",
            (-1, -1, 4),
            "<f4",
            "[N, K, 4] boxes as [x1, y1, x2, y2] in each original image's pixels; padding rows "
            "are 0.",
        ),
        TensorSpec(
            "scores",
            "FP32",
            (-1, -1),
            "<f4",
            "[N, K] scores, best first; padding is 0.",
        ),
        TensorSpec(
            "labels",
            "INT64",
            (-1, -1),
            "<i8",
            "[N, K] class ids (see parameters.labels); padding is -1.",
        ),
        TensorSpec(
            "num_detections",
            "INT32",
            (-1,),
            "<i4",
            "[N] how many of the K rows of each image are real detections.",
        ),
    )
}

OUTPUTS_DESCRIPTION = (
    "K is the request's max_detections parameter (or the server's default): every image's "
    "detections fill the first num_detections rows of boxes, scores and labels, best first, "
    "and the rest is padding (score 0, label -1, box 0)."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestOutput(_Strict):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestHeader(_Strict):
    """The JSON part of an inference request (all of it when no binary data follows)."""

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    # Bounds on what a client can make the server validate; the model takes one input.
    inputs: list[RequestInput] = Field(max_length=8)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=8)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    options: DetectOptions
    outputs: list[RequestedOutput]
    images_from_json: bool


# --- request ----------------------------------------------------------------------------


def split_body(
    body: bytes | bytearray, header_length: str | None
) -> tuple[InferRequestHeader, bytes | bytearray | memoryview]:
    """The JSON inference header and the binary section after it (empty when there is none;
    a view, not a copy: the binary section can be most of a 32 MB body)."""
    size = parse_count(header_length, HEADER_LENGTH)
    binary: bytes | bytearray | memoryview
    if size is None:
        head, binary = body, b""
    else:
        if not 0 < size <= len(body):
            raise InvalidRequestError(
                f"{HEADER_LENGTH} is {size} but the body holds {len(body)} bytes"
            )
        head, binary = body[:size], memoryview(body)[size:]
    where = "" if size is None else f" (the first {len(head)} bytes)"
    what = f"the inference request header{where}"
    check_value_count(head, what)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            "the inference request JSON is not valid UTF-8; BYTES sent as JSON must be UTF-8 "
            "text: send images with the binary tensor data extension (tritonclient: "
            "set_data_from_numpy(..., binary_data=True)) or as base64 text"
        ) from None
    parsed = loads(text, what)
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            f"the inference request must be a JSON object, got {type(parsed).__name__}"
        )
    return validate_header(parsed), binary


def validate_header(parsed: dict[str, Any]) -> InferRequestHeader:
    """The inference request's header from plain values (parsed JSON, or a gRPC message's
    fields), refused with the protocol's field names when it does not fit."""
    try:
        return InferRequestHeader.model_validate(parsed)
    except ValidationError as exc:
        raise InvalidRequestError(
            "the inference request does not match the protocol: " + _describe(exc)
        ) from None


def parse_infer_request(
    body: bytes | bytearray, header_length: str | None, max_images: int
) -> InferRequest:
    """The request, refused as soon as a count passes `max_images` (the shape is checked
    before the binary section is split, and the split stops at the shape's count)."""
    header, binary = split_body(body, header_length)
    tensor, count = the_input(header, max_images)
    binary_size = _binary_size(tensor)
    if binary_size is None:
        if binary:
            raise InvalidRequestError(
                f"the body holds {len(binary)} bytes after the JSON header but no input has "
                "parameters.binary_data_size"
            )
        if tensor.data is None:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r} has neither 'data' nor parameters.binary_data_size"
            )
        images = _json_bytes(tensor.data, count, len(tensor.shape))
    else:
        if header_length is None:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r} has parameters.binary_data_size but the request has no "
                f"{HEADER_LENGTH} header"
            )
        if tensor.data is not None:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r} has both 'data' and parameters.binary_data_size"
            )
        if binary_size != len(binary):
            raise InvalidRequestError(
                f"input {INPUT_NAME!r} declares binary_data_size {binary_size} but the body "
                f"holds {len(binary)} bytes after the JSON header"
            )
        images = deserialize_bytes(binary, count)
    return infer_request(header, images, images_from_json=binary_size is None)


def the_input(header: InferRequestHeader, max_images: int) -> tuple[RequestInput, int]:
    """The request's one input and its element count, refused unless it is the model's BYTES
    input of at most `max_images` elements (HTTP and gRPC alike)."""
    if len(header.inputs) != 1 or header.inputs[0].name != INPUT_NAME:
        names = ", ".join(repr(i.name) for i in header.inputs) or "none"
        raise InvalidRequestError(
            f"this model takes one input, {INPUT_NAME!r} (BYTES, encoded images); got {names}"
        )
    tensor = header.inputs[0]
    count = _element_count(tensor)
    if count > max_images:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r} has {count} elements, over the limit of {max_images} images "
            "per request"
        )
    return tensor, count


def infer_request(
    header: InferRequestHeader, images: list[bytes], *, images_from_json: bool
) -> InferRequest:
    """The request, once its images are out of the wire format: options and outputs read from
    the header (HTTP and gRPC alike)."""
    return InferRequest(
        id=header.id,
        images=images,
        options=_options(header.parameters),
        outputs=_requested_outputs(header),
        images_from_json=images_from_json,
    )


def deserialize_bytes(buffer: bytes | bytearray | memoryview, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length, then bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if len(items) == count:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r}: the shape says {count} elements but the binary data "
                f"holds more ({len(buffer) - offset} bytes remain after element {count - 1})"
            )
        if len(buffer) - offset < _LENGTH_PREFIX.size:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r}: element {len(items)} is cut off inside its 4-byte "
                "length prefix"
            )
        (size,) = _LENGTH_PREFIX.unpack_from(buffer, offset)
        offset += _LENGTH_PREFIX.size
        if size > len(buffer) - offset:
            raise InvalidRequestError(
                f"input {INPUT_NAME!r}: element {len(items)} declares {size} bytes but only "
                f"{len(buffer) - offset} remain"
            )
        items.append(bytes(buffer[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r}: the shape says {count} elements but the binary data holds "
            f"{len(items)}"
        )
    return items


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH_PREFIX.pack(len(item)) + item for item in items)


def _element_count(tensor: RequestInput) -> int:
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"input {INPUT_NAME!r} must be BYTES (encoded images), got {tensor.datatype!r}"
        )
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r} must have shape [N] or [N, 1], got {shape}"
        )
    for key in _UNSUPPORTED_TENSOR_PARAMETERS:
        if key in tensor.parameters:
            raise InvalidRequestError(f"input {INPUT_NAME!r}: {key} is not supported")
    return shape[0]


def _binary_size(tensor: RequestInput) -> int | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r}: binary_data_size must be a byte count, got {size!r}"
        )
    return size


def _json_bytes(data: list[Any], count: int, rank: int) -> list[bytes]:
    if len(data) > count:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r}: the shape says {count} elements but 'data' holds more"
        )
    items = list(_flatten(data, rank))
    if len(items) != count:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r}: the shape says {count} elements but 'data' holds {len(items)}"
        )
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"input {INPUT_NAME!r}: element {i} must be a string, got {type(item).__name__}"
            )
        try:
            raw = item.encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape lone surrogates, which are no UTF-8
            raise InvalidRequestError(
                f"input {INPUT_NAME!r}: element {i} is not valid UTF-8 text; send images with "
                "the binary tensor data extension, or as base64 text"
            ) from None
        out.append(_json_element(raw))
    return out


def _json_element(raw: bytes) -> bytes:
    """A BYTES element sent as a JSON string: the image itself when its bytes start like one
    (a rare all-ASCII image, e.g. a BMP), else its base64 decoding when it is valid base64
    (JSON cannot carry the bytes of most images), else the text's bytes, which the decoder
    then refuses with a message that names the element."""
    if has_image_signature(raw):
        return raw
    try:
        return base64.b64decode(raw, validate=True) if raw else raw
    except binascii.Error:
        return raw


def _flatten(data: list[Any], rank: int) -> Iterator[Any]:
    """The elements of `data`, nested at most `rank` deep (tritonclient sends them flat)."""
    for item in data:
        if isinstance(item, list):
            if rank <= 1:
                raise InvalidRequestError(
                    f"input {INPUT_NAME!r}: 'data' nests lists deeper than its shape"
                )
            yield from _flatten(item, rank - 1)
        else:
            yield item


def _options(parameters: Mapping[str, Any]) -> DetectOptions:
    unknown = [
        k
        for k in parameters
        if k not in _OPTION_PARAMETERS
        and k not in _RESERVED_PARAMETERS
        and not k.startswith("triton_")
    ]
    if unknown:
        raise InvalidRequestError(
            f"unknown request parameter {unknown[0]!r}; this model takes "
            + ", ".join(_OPTION_PARAMETERS)
        )
    values: dict[str, Any] = {}
    for key in ("threshold", "max_detections"):
        value = parameters.get(key)
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise InvalidRequestError(f"parameters.{key} must be a number, got {value!r}")
        if key == "max_detections" and isinstance(value, float):
            if not value.is_integer():
                raise InvalidRequestError(
                    f"parameters.max_detections must be an integer, got {value}"
                )
            value = int(value)
        values[key] = value
    values["classes"] = _classes(parameters.get("classes"))
    values["tiling"] = parameters.get("tiling")
    try:
        return DetectOptions.model_validate(values)
    except ValidationError as exc:
        message = _describe(exc, prefix="parameters.")
        if any(err["loc"][:1] == ("tiling",) for err in exc.errors()):
            raise ValidationFailedError(message) from None  # 422, as on /v1
        raise InvalidRequestError(message) from None


def _classes(value: Any) -> list[str | int] | None:
    """Parameters are scalars in the protocol, so a list of classes comes as 'circle,star'."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"parameters.classes must be names or ids, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    if isinstance(value, list) and all(
        isinstance(c, str | int) and not isinstance(c, bool) for c in value
    ):
        return list(value)
    raise InvalidRequestError(
        f"parameters.classes must be a comma-separated string of names or ids, got {value!r}"
    )


def _requested_outputs(header: InferRequestHeader) -> list[RequestedOutput]:
    default_binary = header.parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequestError(
            f"parameters.binary_data_output must be true or false, got {default_binary!r}"
        )
    if header.outputs is None:
        return [RequestedOutput(name, default_binary) for name in OUTPUTS]
    requested: list[RequestedOutput] = []
    for out in header.outputs:
        if out.name not in OUTPUTS:
            raise InvalidRequestError(
                f"unknown output {out.name!r}; this model's outputs are " + ", ".join(OUTPUTS)
            )
        if any(r.name == out.name for r in requested):
            raise InvalidRequestError(f"output {out.name!r} is requested twice")
        for key in _UNSUPPORTED_TENSOR_PARAMETERS:
            if key in out.parameters:
                raise InvalidRequestError(f"output {out.name!r}: {key} is not supported")
        binary = out.parameters.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidRequestError(
                f"output {out.name!r}: binary_data must be true or false, got {binary!r}"
            )
        requested.append(RequestedOutput(out.name, binary))
    return requested


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{prefix}{where}: {err['msg']}")
    return "; ".join(parts)


# --- response ---------------------------------------------------------------------------


def encode_infer_response(
    *,
    model_name: str,
    request_id: str | None,
    tensors: Mapping[str, np.ndarray],
    outputs: Sequence[RequestedOutput],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (the value
    of the response's Inference-Header-Content-Length; None means the body is plain JSON)."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        spec = OUTPUTS[out.name]
        array = np.ascontiguousarray(tensors[out.name], dtype=spec.dtype)
        tensor: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": list(array.shape),
        }
        if out.binary:
            raw = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        described.append(tensor)
    body: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = described
    head = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


# --- metadata ---------------------------------------------------------------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "detr-serve", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(
    *,
    name: str,
    backend: str,
    labels: Mapping[int, str],
    default_threshold: float,
    default_max_detections: int,
) -> dict[str, Any]:
    platform = {"torch": "pytorch_transformers", "onnx": "onnxruntime_onnx"}.get(backend, backend)
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": platform,
        "inputs": [_tensor_metadata(INPUT)],
        "outputs": [_tensor_metadata(spec) for spec in OUTPUTS.values()],
        "parameters": {
            "description": OUTPUTS_DESCRIPTION,
            "request_parameters": {
                "threshold": f"minimum score, 0..1 (default {default_threshold})",
                "max_detections": f"K, 1..1000 (default {default_max_detections})",
                "classes": "only these classes: comma-separated names or ids",
                "tiling": 'tiled inference: true, "auto", or the options object (or its JSON '
                "text): tile_size, overlap, full_image, merge, match_metric, "
                "match_threshold, class_agnostic, auto",
            },
            "labels": {str(i): labels[i] for i in sorted(labels)},
        },
    }


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": list(spec.shape),
        "parameters": {"description": spec.description},
    }


def check_model(served: str, name: str, version: str | None) -> None:
    """404 unless `name` (and `version`, when given) is the served model."""
    if name != served:
        raise UnknownModelError(f"unknown model {name!r}; this server serves {served!r}")
    if version is not None and version != MODEL_VERSION:
        raise UnknownModelError(
            f"unknown version {version!r} of model {name!r}; its only version is {MODEL_VERSION!r}"
        )
