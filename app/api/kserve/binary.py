"""The binary tensor data extension of v2 REST: a body is a JSON header, then the raw tensors
(its length in the Inference-Header-Content-Length header); a BYTES tensor is its elements,
each a 4-byte little-endian length and then the bytes. Request bodies in, response bodies out."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.api.http.request_body import check_value_count, loads, parse_count
from app.api.kserve.protocol import (
    MODEL_VERSION,
    InferRequestHeader,
    RequestedOutput,
    validate_header,
)
from app.api.kserve.tensors import INPUT_NAME, OUTPUTS
from app.errors import InvalidRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH_PREFIX = struct.Struct("<I")


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
