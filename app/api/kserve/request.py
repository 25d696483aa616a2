"""A v2 inference request parsed: the REST body (JSON header, images as binary tensor data or
JSON strings) or a gRPC message's fields -> InferRequest (images, detect options, requested
outputs), refused with a clear 400 naming what is wrong. No web framework here: bytes and dicts
in, so every rule is unit-tested without a server."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any

from app.api.kserve.binary import HEADER_LENGTH, deserialize_bytes, split_body
from app.api.kserve.options import detect_options
from app.api.kserve.protocol import InferRequest, InferRequestHeader, RequestedOutput, RequestInput
from app.api.kserve.tensors import INPUT_NAME, OUTPUTS
from app.errors import InvalidRequestError
from app.images.structure import has_image_signature

_UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "classification")


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
        options=detect_options(header.parameters),
        outputs=_requested_outputs(header),
        images_from_json=images_from_json,
    )


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
