"""A v2 request parsed on its own (app/api/kserve/request.py, with options.py and binary.py
under it): bodies built by tritonclient's own encoders, and every malformed one refused."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import tritonclient.http as httpclient

from app.api.http.request_body import MAX_JSON_VALUES
from app.api.kserve.protocol import RequestedOutput
from app.api.kserve.request import parse_infer_request
from app.api.kserve.tensors import OUTPUTS
from app.errors import PayloadTooLargeError
from tests.unit.kserve_bodies import MAX_IMAGES, images_input, json_body, rejects, triton_body


def test_binary_request_from_tritonclient_yields_each_image_in_order() -> None:
    images = [b"\xff\xd8first", b"", b"\x89PNG\r\n\x1a\nthird\x00"]
    body, header_length = triton_body(images, parameters={"threshold": 0.25})
    parsed = parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == images
    assert parsed.images_from_json is False
    assert parsed.options.threshold == 0.25
    # tritonclient names no outputs and asks for all of them in binary.
    assert parsed.outputs == [RequestedOutput(n, True) for n in OUTPUTS]


def test_json_request_yields_the_utf8_bytes_of_each_string() -> None:
    body, header_length = triton_body([b"plain", "caf\u00e9".encode()], binary=False)
    assert header_length is None
    parsed = parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == [b"plain", "caf\u00e9".encode()]
    assert parsed.images_from_json is True


def test_json_base64_elements_are_decoded_and_images_are_kept() -> None:
    jpeg, png = b"\xff\xd8\xff\xe0 rest of a jpeg", b"\x89PNG\r\n\x1a\n rest of a png"
    bmp = b"BM6AAA"  # an all-ASCII image that is also valid base64: the image wins
    strings = [base64.b64encode(jpeg), base64.b64encode(png), bmp, b"not base64!", b"QUJD"]
    body, header_length = triton_body(strings, binary=False)
    parsed = parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == [jpeg, png, bmp, b"not base64!", b"ABC"]
    assert parsed.images_from_json is True


def test_nested_json_data_and_n_by_1_shape_are_accepted() -> None:
    body = json_body({"inputs": [images_input(shape=[2, 1], data=[["a"], ["b"]])]})
    assert parse_infer_request(body, None, MAX_IMAGES).images == [b"a", b"b"]


def test_request_parameters_become_detect_options() -> None:
    body, header_length = triton_body(
        [b"x"], parameters={"threshold": 0.4, "max_detections": 7, "classes": "circle, 3"}
    )
    options = parse_infer_request(body, header_length, MAX_IMAGES).options
    assert (options.threshold, options.max_detections) == (0.4, 7)
    assert options.classes == ["circle", "3"]


def test_tritonclient_reserved_parameters_are_accepted() -> None:
    tensor = httpclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    body, size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], priority=2, timeout=1000, request_id="r-1"
    )
    parsed = parse_infer_request(body, str(size), MAX_IMAGES)
    assert parsed.id == "r-1" and parsed.images == [b"x"]


def test_requested_outputs_keep_their_order_and_binary_flag() -> None:
    outputs = [
        httpclient.InferRequestedOutput("scores", binary_data=False),
        httpclient.InferRequestedOutput("boxes", binary_data=True),
    ]
    body, header_length = triton_body([b"x"], outputs=outputs)
    parsed = parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.outputs == [
        RequestedOutput("scores", False),
        RequestedOutput("boxes", True),
    ]


def test_binary_data_output_is_the_default_of_outputs_without_their_own_flag() -> None:
    body = json_body(
        {
            "inputs": [images_input()],
            "outputs": [
                {"name": "labels"},
                {"name": "scores", "parameters": {"binary_data": False}},
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    assert parse_infer_request(body, None, MAX_IMAGES).outputs == [
        RequestedOutput("labels", True),
        RequestedOutput("scores", False),
    ]


def test_plain_json_request_without_outputs_gets_all_of_them_as_json() -> None:
    parsed = parse_infer_request(json_body({"inputs": [images_input()]}), None, MAX_IMAGES)
    assert parsed.outputs == [RequestedOutput(n, False) for n in OUTPUTS]


@pytest.mark.parametrize(
    ("header_length", "text"),
    [
        ("ten", "Inference-Header-Content-Length must be a byte count, got 'ten'"),
        ("-5", "must be a byte count"),
        ("0", "Inference-Header-Content-Length is 0 but the body holds"),
        ("999999", "Inference-Header-Content-Length is 999999 but the body holds"),
        ("10", "the inference request header (the first 10 bytes) is not valid JSON"),
    ],
    ids=["not-a-number", "negative", "zero", "past-the-end", "inside-the-json"],
)
def test_bad_header_length_is_a_clear_400(header_length: str, text: str) -> None:
    body, _ = triton_body([b"image"])
    rejects(body, header_length, text)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"inputs": [', "is not valid JSON: Expecting value at byte 12"),
        (b"[1, 2]", "the inference request must be a JSON object, got list"),
        (b"{}", "does not match the protocol: inputs: Field required"),
        (
            json_body({"inputs": [images_input()], "extra": 1}),
            "extra: Extra inputs are not permitted",
        ),
        (
            json_body({"inputs": [images_input(shape="1")]}),
            "inputs.0.shape: Input should be a valid list",
        ),
        (json_body({"inputs": []}), "takes one input, 'images' (BYTES, encoded images); got none"),
        (json_body({"inputs": [images_input(name="INPUT0")]}), "got 'INPUT0'"),
        (
            json_body({"inputs": [images_input(datatype="UINT8", data=[1])]}),
            "input 'images' must be BYTES (encoded images), got 'UINT8'",
        ),
        (json_body({"inputs": [images_input(shape=[1, 2])]}), "shape [N] or [N, 1], got [1, 2]"),
        (json_body({"inputs": [images_input(shape=[2])]}), "shape says 2 elements but 'data'"),
        (json_body({"inputs": [images_input(data=[5])]}), "element 0 must be a string, got int"),
        (json_body({"inputs": [images_input(data=None)]}), "has neither 'data' nor"),
        (
            b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", '
            b'"data": ["\\udc80"]}]}',
            "element 0 is not valid UTF-8 text; send images with the binary tensor data",
        ),
        (
            b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", '
            b'"data": ["\xff\xd8\xff\xe0"]}]}',
            "is not valid UTF-8; BYTES sent as JSON must be UTF-8 text",
        ),
        (
            json_body({"inputs": [images_input(parameters={"shared_memory_region": "r"})]}),
            "shared_memory_region is not supported",
        ),
    ],
    ids=[
        "truncated-json",
        "not-an-object",
        "no-inputs",
        "unknown-field",
        "shape-not-a-list",
        "zero-inputs",
        "wrong-input-name",
        "wrong-datatype",
        "wrong-rank",
        "count-mismatch",
        "non-string-element",
        "no-data",
        "lone-surrogate",
        "raw-jpeg-bytes-in-json",
        "shared-memory",
    ],
)
def test_malformed_json_request_is_a_400_saying_what_is_wrong(body: bytes, text: str) -> None:
    rejects(body, None, text)


def test_binary_size_that_disagrees_with_the_body_is_refused() -> None:
    body, header_length = triton_body([b"abcdef"])
    rejects(body + b"junk", header_length, "declares binary_data_size 10 but the body holds 14")
    rejects(body[:-2], header_length, "declares binary_data_size 10 but the body holds 8")


def test_binary_input_without_header_length_is_refused() -> None:
    header = json_body({"inputs": [images_input(data=None, parameters={"binary_data_size": 5})]})
    rejects(header, None, "has parameters.binary_data_size but the request has no Inference")


def test_binary_bytes_after_a_header_that_declares_none_are_refused() -> None:
    header = json_body({"inputs": [images_input()]})
    rejects(header + b"\x00" * 8, str(len(header)), "8 bytes after the JSON header but no input")


def test_data_and_binary_size_together_are_refused() -> None:
    header = json_body({"inputs": [images_input(parameters={"binary_data_size": 4})]})
    rejects(header + b"\x00" * 4, str(len(header)), "has both 'data' and parameters.binary")


@pytest.mark.parametrize(
    ("parameters", "text"),
    [
        ({"threshold": 1.5}, "parameters.threshold: Input should be less than or equal to 1"),
        ({"threshold": "high"}, "parameters.threshold must be a number, got 'high'"),
        ({"threshold": True}, "parameters.threshold must be a number, got True"),
        ({"max_detections": 0}, "parameters.max_detections: Input should be greater than"),
        ({"max_detections": 2.5}, "parameters.max_detections must be an integer, got 2.5"),
        ({"classes": {"a": 1}}, "parameters.classes must be a comma-separated string"),
        ({"treshold": 0.5}, "unknown request parameter 'treshold'; this model takes threshold"),
        ({"binary_data_output": "yes"}, "binary_data_output must be true or false"),
    ],
    ids=[
        "threshold-high",
        "threshold-text",
        "threshold-bool",
        "zero-detections",
        "fractional-detections",
        "classes-object",
        "misspelt",
        "binary-output-text",
    ],
)
def test_bad_request_parameters_are_a_400_naming_them(parameters: dict, text: str) -> None:
    rejects(json_body({"inputs": [images_input()], "parameters": parameters}), None, text)


@pytest.mark.parametrize(
    ("outputs", "text"),
    [
        ([{"name": "logits"}], "unknown output 'logits'; this model's outputs are boxes, scores"),
        ([{"name": "boxes"}, {"name": "boxes"}], "output 'boxes' is requested twice"),
        ([{"name": "boxes", "parameters": {"binary_data": 1}}], "binary_data must be true or"),
        ([{"name": "labels", "parameters": {"classification": 3}}], "classification is not"),
    ],
    ids=["unknown", "twice", "binary-not-bool", "classification"],
)
def test_bad_requested_outputs_are_refused(outputs: list, text: str) -> None:
    rejects(json_body({"inputs": [images_input()], "outputs": outputs}), None, text)


def _binary_elements(count: int, shape: list[int]) -> tuple[bytes, str]:
    binary = b"\x00\x00\x00\x00" * count
    head = json_body(
        {
            "inputs": [
                images_input(shape=shape, data=None, parameters={"binary_data_size": len(binary)})
            ]
        }
    )
    return head + binary, str(len(head))


@pytest.mark.parametrize(
    ("count", "shape", "text"),
    [
        (100_000, [100_000], "has 100000 elements, over the limit of 16 images"),
        (100_000, [17, 1], "has 17 elements, over the limit of 16 images"),
        (100_000, [1], "the shape says 1 elements but the binary data holds more"),
        (100_000, [16], "the shape says 16 elements but the binary data holds more"),
    ],
    ids=["shape-over-limit", "2d-shape-over-limit", "split-past-shape-1", "split-past-shape-16"],
)
def test_counts_past_a_limit_are_refused_before_the_split(count, shape, text) -> None:
    body, header_length = _binary_elements(count, shape)
    rejects(body, header_length, text)


@pytest.mark.parametrize(
    ("body", "header_length", "text"),
    [
        (b'{"inputs":' + b"[" * 50_000 + b"]" * 50_000 + b"}", None, "nests arrays or objects"),
        (
            json_body({"inputs": [images_input(data=[[[["a"]]]])]}),
            None,
            "'data' nests lists deeper than its shape",
        ),
        (
            json_body({"inputs": [images_input()]})[:-1]
            + b', "parameters": {"priority": '
            + b"9" * 5000
            + b"}}",
            None,
            "an integer of 5000 digits",
        ),
        (json_body({"inputs": [images_input()]}), "\u00b2", "must be a byte count, got '\u00b2'"),
        (json_body({"inputs": [images_input()]}), "1" + "0" * 5000, "must be a byte count"),
        (json_body({"inputs": [images_input()]}), "-5", "must be a byte count"),
    ],
    ids=[
        "deep-json",
        "deep-data",
        "huge-int",
        "superscript-length",
        "5000-digit-length",
        "negative",
    ],
)
def test_what_python_refuses_to_parse_is_a_400(body: bytes, header_length, text: str) -> None:
    rejects(body, header_length, text)


def test_a_json_header_over_the_value_limit_is_a_413_before_parsing() -> None:
    body = json_body({"inputs": [images_input(shape=[1], data=[""] * (MAX_JSON_VALUES + 1))]})
    with pytest.raises(PayloadTooLargeError, match=f"over the limit of {MAX_JSON_VALUES}"):
        parse_infer_request(body, None, MAX_IMAGES)


def test_more_inputs_than_the_protocol_bound_are_refused() -> None:
    rejects(json_body({"inputs": [images_input()] * 9}), None, "at most 8 items")
