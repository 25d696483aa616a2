"""The v2 protocol codec on its own: bodies built and read by tritonclient's own encoders."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import tritonclient.http as httpclient

from app.api.http.request_body import MAX_JSON_VALUES, inflate
from app.api.kserve import codec
from app.api.v1.encode import v2_tensors
from app.engine.tasks import ImageDetections
from app.errors import InvalidRequestError, PayloadTooLargeError
from app.service import AnsweredImage, DetectResult

MAX_IMAGES = 16


def triton_body(
    images: list[bytes],
    *,
    binary: bool = True,
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    parameters: dict | None = None,
    request_id: str = "",
) -> tuple[bytes, str | None]:
    """The request body and Inference-Header-Content-Length that tritonclient would send."""
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, parameters=parameters, request_id=request_id
    )
    return body, None if header_length is None else str(header_length)


def json_body(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def images_input(**overrides: object) -> dict:
    return {"name": "images", "shape": [1], "datatype": "BYTES", "data": ["abc"]} | overrides


def result(*dets: tuple[int, float, list[float]]) -> AnsweredImage:
    detections = ImageDetections(
        scores=np.array([s for _, s, _ in dets], dtype=np.float32),
        labels=np.array([c for c, _, _ in dets], dtype=np.int64),
        boxes=np.array([box for _, _, box in dets], dtype=np.float32).reshape(-1, 4),
        batch_size=1,
        inference_s=0.0,
        postprocess_s=0.0,
    )
    return AnsweredImage(width=100, height=80, detections=detections, timings={})


def rejects(body: bytes, header_length: str | None, text: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        codec.parse_infer_request(body, header_length, MAX_IMAGES)
    assert caught.value.status_code == 400
    assert text in caught.value.message, caught.value.message


# --- requests ---------------------------------------------------------------------------


def test_binary_request_from_tritonclient_yields_each_image_in_order() -> None:
    images = [b"\xff\xd8first", b"", b"\x89PNG\r\n\x1a\nthird\x00"]
    body, header_length = triton_body(images, parameters={"threshold": 0.25})
    parsed = codec.parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == images
    assert parsed.images_from_json is False
    assert parsed.options.threshold == 0.25
    # tritonclient names no outputs and asks for all of them in binary.
    assert parsed.outputs == [codec.RequestedOutput(n, True) for n in codec.OUTPUTS]


def test_json_request_yields_the_utf8_bytes_of_each_string() -> None:
    body, header_length = triton_body([b"plain", "caf\u00e9".encode()], binary=False)
    assert header_length is None
    parsed = codec.parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == [b"plain", "caf\u00e9".encode()]
    assert parsed.images_from_json is True


def test_json_base64_elements_are_decoded_and_images_are_kept() -> None:
    jpeg, png = b"\xff\xd8\xff\xe0 rest of a jpeg", b"\x89PNG\r\n\x1a\n rest of a png"
    bmp = b"BM6AAA"  # an all-ASCII image that is also valid base64: the image wins
    strings = [base64.b64encode(jpeg), base64.b64encode(png), bmp, b"not base64!", b"QUJD"]
    body, header_length = triton_body(strings, binary=False)
    parsed = codec.parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.images == [jpeg, png, bmp, b"not base64!", b"ABC"]
    assert parsed.images_from_json is True


def test_nested_json_data_and_n_by_1_shape_are_accepted() -> None:
    body = json_body({"inputs": [images_input(shape=[2, 1], data=[["a"], ["b"]])]})
    assert codec.parse_infer_request(body, None, MAX_IMAGES).images == [b"a", b"b"]


def test_request_parameters_become_detect_options() -> None:
    body, header_length = triton_body(
        [b"x"], parameters={"threshold": 0.4, "max_detections": 7, "classes": "circle, 3"}
    )
    options = codec.parse_infer_request(body, header_length, MAX_IMAGES).options
    assert (options.threshold, options.max_detections) == (0.4, 7)
    assert options.classes == ["circle", "3"]


def test_tritonclient_reserved_parameters_are_accepted() -> None:
    tensor = httpclient.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    body, size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], priority=2, timeout=1000, request_id="r-1"
    )
    parsed = codec.parse_infer_request(body, str(size), MAX_IMAGES)
    assert parsed.id == "r-1" and parsed.images == [b"x"]


def test_requested_outputs_keep_their_order_and_binary_flag() -> None:
    outputs = [
        httpclient.InferRequestedOutput("scores", binary_data=False),
        httpclient.InferRequestedOutput("boxes", binary_data=True),
    ]
    body, header_length = triton_body([b"x"], outputs=outputs)
    parsed = codec.parse_infer_request(body, header_length, MAX_IMAGES)
    assert parsed.outputs == [
        codec.RequestedOutput("scores", False),
        codec.RequestedOutput("boxes", True),
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
    assert codec.parse_infer_request(body, None, MAX_IMAGES).outputs == [
        codec.RequestedOutput("labels", True),
        codec.RequestedOutput("scores", False),
    ]


def test_plain_json_request_without_outputs_gets_all_of_them_as_json() -> None:
    parsed = codec.parse_infer_request(json_body({"inputs": [images_input()]}), None, MAX_IMAGES)
    assert parsed.outputs == [codec.RequestedOutput(n, False) for n in codec.OUTPUTS]


def test_bytes_elements_round_trip_through_the_length_prefix_format() -> None:
    items = [b"", b"a", b"\x00" * 300, bytes(range(256))]
    packed = codec.serialize_bytes(items)
    assert packed[:4] == struct.pack("<I", 0)
    assert codec.deserialize_bytes(packed, len(items)) == items


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
    ("buffer", "count", "text"),
    [
        (b"\x05\x00", 1, "element 0 is cut off inside its 4-byte length prefix"),
        (struct.pack("<I", 10) + b"abc", 1, "element 0 declares 10 bytes but only 3 remain"),
        (codec.serialize_bytes([b"a", b"b"]), 3, "the shape says 3 elements but the binary"),
        (codec.serialize_bytes([b"a", b"b"]), 1, "the shape says 1 elements but the binary"),
    ],
    ids=["cut-prefix", "short-element", "too-few", "too-many"],
)
def test_malformed_bytes_elements_are_refused(buffer: bytes, count: int, text: str) -> None:
    with pytest.raises(InvalidRequestError, match=text):
        codec.deserialize_bytes(buffer, count)


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


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_are_inflated(encoding: str) -> None:
    body, _ = triton_body([b"x"])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert inflate(packed, encoding, max_bytes=10_000, max_ratio=20) == body


@pytest.mark.parametrize(
    ("size", "max_bytes", "ratio", "text"),
    [
        (3_000_000, 2_000_000, 1000.0, "inflates past the limit of 2000000 bytes"),
        (3_000_000, 16_000_000, 20.0, "more than 20 times its"),
        (1_048_577, 16_000_000, 1.0, "over the limit of the inflation ratio"),
    ],
    ids=["size-cap", "ratio-cap", "ratio-floor"],
)
def test_compressed_body_inflating_past_a_limit_is_a_413(
    size: int, max_bytes: int, ratio: float, text: str
) -> None:
    bomb = gzip.compress(b"\x00" * size)
    with pytest.raises(PayloadTooLargeError, match=text):
        inflate(bomb, "gzip", max_bytes=max_bytes, max_ratio=ratio)


def test_a_body_just_under_the_ratio_floor_inflates() -> None:
    body = b"\x00" * (1 << 20)
    assert inflate(gzip.compress(body), "gzip", max_bytes=1 << 24, max_ratio=1.0) == body


@pytest.mark.parametrize(
    ("body", "encoding", "text"),
    [
        (b"not gzip", "gzip", "the gzip body cannot be decompressed"),
        (gzip.compress(b"x" * 100)[:-12], "gzip", "the gzip body is truncated"),
        (b"x", "br", "unsupported Content-Encoding 'br'"),
        (b"x", "gzip, gzip", "unsupported Content-Encoding 'gzip, gzip'"),
        (gzip.compress(b"x") * 2, "gzip", "bytes after its end"),
    ],
    ids=["garbage", "truncated", "brotli", "stacked", "concatenated"],
)
def test_bad_compressed_bodies_are_refused(body: bytes, encoding: str, text: str) -> None:
    with pytest.raises(InvalidRequestError, match=text):
        inflate(body, encoding, max_bytes=10_000, max_ratio=20)


# --- responses --------------------------------------------------------------------------


def test_detections_are_padded_to_k_with_zero_scores_and_minus_one_labels() -> None:
    response = DetectResult(
        "m",
        [
            result((2, 0.9, [1, 2, 3, 4]), (0, 0.5, [5, 6, 7, 8])),
            result(),
            result((4, 0.7, [0.5, 0.25, 10.75, 20.0])),
        ],
    )
    t = v2_tensors(response, max_detections=3)
    assert t["boxes"].shape == (3, 3, 4) and t["boxes"].dtype == np.float32
    assert t["scores"].shape == (3, 3) and t["scores"].dtype == np.float32
    assert t["labels"].shape == (3, 3) and t["labels"].dtype == np.int64
    assert t["num_detections"].tolist() == [2, 0, 1] and t["num_detections"].dtype == np.int32
    assert t["labels"].tolist() == [[2, 0, -1], [-1, -1, -1], [4, -1, -1]]
    expected_scores = np.array([[0.9, 0.5, 0], [0, 0, 0], [0.7, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(t["scores"], expected_scores)
    assert t["boxes"][0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]]
    assert t["boxes"][2, 0].tolist() == [0.5, 0.25, 10.75, 20.0]
    assert not t["boxes"][1].any()


def sample_tensors() -> dict[str, np.ndarray]:
    response = DetectResult("m", [result((1, 0.75, [1.5, 2, 30, 40]))])
    return v2_tensors(response, max_detections=2)


def test_binary_response_is_read_back_by_tritonclient() -> None:
    tensors = sample_tensors()
    outputs = [codec.RequestedOutput(n, True) for n in codec.OUTPUTS]
    body, header_length = codec.encode_infer_response(
        model_name="m", request_id="r-7", tensors=tensors, outputs=outputs
    )
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["model_name"] == "m" and header["id"] == "r-7"
    assert [o["name"] for o in header["outputs"]] == list(codec.OUTPUTS)
    assert all("data" not in o for o in header["outputs"])
    got = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    for name, expected in tensors.items():
        np.testing.assert_array_equal(got.as_numpy(name), expected)
        assert got.as_numpy(name).dtype == expected.dtype


def test_json_response_is_plain_json_that_tritonclient_reads() -> None:
    tensors = sample_tensors()
    outputs = [codec.RequestedOutput("labels", False), codec.RequestedOutput("boxes", False)]
    body, header_length = codec.encode_infer_response(
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
    outputs = [codec.RequestedOutput("scores", False), codec.RequestedOutput("labels", True)]
    body, header_length = codec.encode_infer_response(
        model_name="m", request_id=None, tensors=tensors, outputs=outputs
    )
    assert header_length is not None
    assert body[header_length:] == tensors["labels"].astype("<i8").tobytes()
    got = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(got.as_numpy("scores"), tensors["scores"])
    np.testing.assert_array_equal(got.as_numpy("labels"), tensors["labels"])


# --- metadata and models ----------------------------------------------------------------


def test_model_metadata_documents_tensors_padding_and_labels() -> None:
    meta = codec.model_metadata(
        name="m",
        backend="torch",
        labels={0: "circle", 1: "square"},
        default_threshold=0.5,
        default_max_detections=100,
    )
    assert meta["versions"] == ["1"] and meta["platform"] == "pytorch_transformers"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("images", "BYTES", [-1])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("boxes", "FP32", [-1, -1, 4]),
        ("scores", "FP32", [-1, -1]),
        ("labels", "INT64", [-1, -1]),
        ("num_detections", "INT32", [-1]),
    ]
    assert "label -1" in meta["parameters"]["description"]
    assert meta["parameters"]["labels"] == {"0": "circle", "1": "square"}
    assert "default 100" in meta["parameters"]["request_parameters"]["max_detections"]


def test_unknown_model_or_version_is_a_404() -> None:
    codec.check_model("m", "m", None)
    codec.check_model("m", "m", "1")
    with pytest.raises(codec.UnknownModelError, match="unknown model 'x'; this server serves 'm'"):
        codec.check_model("m", "x", None)
    with pytest.raises(codec.UnknownModelError, match="unknown version '2' of model 'm'") as e:
        codec.check_model("m", "m", "2")
    assert e.value.status_code == 404


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


def test_the_split_stops_at_the_shapes_count(monkeypatch) -> None:
    """Only count + 1 length prefixes are read, however many the buffer holds."""
    reads = []
    real = codec._LENGTH_PREFIX

    class Counting:
        size = real.size

        def unpack_from(self, buffer, offset):
            reads.append(offset)
            return real.unpack_from(buffer, offset)

    monkeypatch.setattr(codec, "_LENGTH_PREFIX", Counting())
    with pytest.raises(InvalidRequestError):
        codec.deserialize_bytes(b"\x00\x00\x00\x00" * 1_000_000, 3)
    assert len(reads) == 3


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
        codec.parse_infer_request(body, None, MAX_IMAGES)


def test_more_inputs_than_the_protocol_bound_are_refused() -> None:
    rejects(json_body({"inputs": [images_input()] * 9}), None, "at most 8 items")
