"""The binary tensor data extension on its own (app/api/kserve/binary.py): BYTES elements
packed and unpacked, and response bodies that tritonclient reads back."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient

from app.api.kserve import binary
from app.api.kserve.protocol import RequestedOutput
from app.api.kserve.tensors import OUTPUTS, v2_tensors
from app.errors import InvalidRequestError
from app.service import DetectResult
from tests.unit.kserve_bodies import result


def test_bytes_elements_round_trip_through_the_length_prefix_format() -> None:
    items = [b"", b"a", b"\x00" * 300, bytes(range(256))]
    packed = binary.serialize_bytes(items)
    assert packed[:4] == struct.pack("<I", 0)
    assert binary.deserialize_bytes(packed, len(items)) == items


@pytest.mark.parametrize(
    ("buffer", "count", "text"),
    [
        (b"\x05\x00", 1, "element 0 is cut off inside its 4-byte length prefix"),
        (struct.pack("<I", 10) + b"abc", 1, "element 0 declares 10 bytes but only 3 remain"),
        (binary.serialize_bytes([b"a", b"b"]), 3, "the shape says 3 elements but the binary"),
        (binary.serialize_bytes([b"a", b"b"]), 1, "the shape says 1 elements but the binary"),
    ],
    ids=["cut-prefix", "short-element", "too-few", "too-many"],
)
def test_malformed_bytes_elements_are_refused(buffer: bytes, count: int, text: str) -> None:
    with pytest.raises(InvalidRequestError, match=text):
        binary.deserialize_bytes(buffer, count)


def test_the_split_stops_at_the_shapes_count(monkeypatch) -> None:
    """Only count + 1 length prefixes are read, however many the buffer holds."""
    reads = []
    real = binary._LENGTH_PREFIX

    class Counting:
        size = real.size

        def unpack_from(self, buffer, offset):
            reads.append(offset)
            return real.unpack_from(buffer, offset)

    monkeypatch.setattr(binary, "_LENGTH_PREFIX", Counting())
    with pytest.raises(InvalidRequestError):
        binary.deserialize_bytes(b"\x00\x00\x00\x00" * 1_000_000, 3)
    assert len(reads) == 3


def sample_tensors() -> dict[str, np.ndarray]:
    response = DetectResult("m", [result((1, 0.75, [1.5, 2, 30, 40]))])
    return v2_tensors(response, max_detections=2)


def test_binary_response_is_read_back_by_tritonclient() -> None:
    tensors = sample_tensors()
    outputs = [RequestedOutput(n, True) for n in OUTPUTS]
    body, header_length = binary.encode_infer_response(
        model_name="m", request_id="r-7", tensors=tensors, outputs=outputs
    )
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["model_name"] == "m" and header["id"] == "r-7"
    assert [o["name"] for o in header["outputs"]] == list(OUTPUTS)
    assert all("data" not in o for o in header["outputs"])
    got = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    for name, expected in tensors.items():
        np.testing.assert_array_equal(got.as_numpy(name), expected)
        assert got.as_numpy(name).dtype == expected.dtype


def test_json_response_is_plain_json_that_tritonclient_reads() -> None:
    tensors = sample_tensors()
    outputs = [RequestedOutput("labels", False), RequestedOutput("boxes", False)]
    body, header_length = binary.encode_infer_response(
        model_name="m", request_id=None, tensors=tensors, outputs=outputs
    )
    assert header_length is None
    parsed = json.loads(body)
    assert "id" not in parsed
    assert parsed["outputs"][0] == {
        "name": "labels",
        "datatype": "INT64",
        "shape": [1, 2],
        "data": [1, -1],
    }
    got = httpclient.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(got.as_numpy("boxes"), tensors["boxes"])
    assert got.as_numpy("scores") is None  # not requested


def test_mixed_response_sends_only_binary_outputs_after_the_header() -> None:
    tensors = sample_tensors()
    outputs = [RequestedOutput("scores", False), RequestedOutput("labels", True)]
    body, header_length = binary.encode_infer_response(
        model_name="m", request_id=None, tensors=tensors, outputs=outputs
    )
    assert header_length is not None
    assert body[header_length:] == tensors["labels"].astype("<i8").tobytes()
    got = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(got.as_numpy("scores"), tensors["scores"])
    np.testing.assert_array_equal(got.as_numpy("labels"), tensors["labels"])
