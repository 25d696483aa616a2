"""End to end: the KServe v2 protocol of the real server, driven by the stock tritonclient."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from scripts.bench.serverproc import RunningServer
from tests.conftest import LABELS, shapes_image

pytestmark = pytest.mark.e2e

MODEL = "tiny"
K = 150  # more than the tiny model's 20 queries x 5 classes: every image gets padding


def tiny_server_args(model_dir: Path) -> list[str]:
    """The tiny model as MODEL, every detection kept, batches given time to fill."""
    return [
        *("--model", str(model_dir), "--model-name", MODEL),
        *("--default-threshold", "0.0", "--max-batch-delay-ms", "20"),
    ]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(tiny_server_args(tiny_model_dir), env={"DETR_SERVE_TORCH_THREADS": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def images_input(images: list[bytes], binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    return tensor


def ascii_bmp(width: int = 64, height: int = 48) -> bytes:
    """A real BMP whose every byte is below 0x80, so it is valid UTF-8 and can travel as a
    JSON string (almost no real image can)."""
    img = Image.new("RGB", (width, height))
    img.putdata([(x * 2 % 128, y * 2 % 128, 60) for y in range(height) for x in range(width)])
    img.paste((120, 10, 10), (8, 8, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="BMP", dpi=(1, 1))  # the default 96 dpi puts 0xC4 in the header
    data = buf.getvalue()
    assert max(data) < 0x80
    return data


def v1_detect(
    server: RunningServer,
    images: list[bytes],
    headers: dict[str, str] | None = None,
    **options: object,
) -> list[dict]:
    files = [
        ("file", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)
    ]
    r = httpx.post(
        server.url + "/v1/detect",
        files=files,
        data={k: str(v) for k, v in options.items()},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


def assert_same_as_v1(result: httpclient.InferResult, v1: list[dict], k: int) -> None:
    """`result`: tritonclient's InferResult, of its HTTP or its gRPC client."""
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    labels, counts = result.as_numpy("labels"), result.as_numpy("num_detections")
    n = len(v1)
    assert boxes.shape == (n, k, 4) and boxes.dtype == np.float32
    assert scores.shape == (n, k) and scores.dtype == np.float32
    assert labels.shape == (n, k) and labels.dtype == np.int64
    assert counts.shape == (n,) and counts.dtype == np.int32
    for i, image in enumerate(v1):
        dets = image["detections"]
        m = len(dets)
        assert 0 < m < k and counts[i] == m
        # v2 carries the engine's float32 values; /v1 rounds boxes to 2 decimals, scores to 5.
        # Half a hundredth exactly (39.375 -> 39.38) passes 0.005 by float error: hence 0.0051.
        np.testing.assert_allclose(boxes[i, :m], [d["box"] for d in dets], rtol=0, atol=0.0051)
        np.testing.assert_allclose(scores[i, :m], [d["score"] for d in dets], rtol=0, atol=5e-6)
        np.testing.assert_array_equal(labels[i, :m], [d["class_id"] for d in dets])
        assert (scores[i, m:] == 0).all() and (labels[i, m:] == -1).all()
        assert not boxes[i, m:].any()


def test_health_endpoints_answer_tritonclient(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(MODEL, "2")


def test_server_metadata_names_the_binary_extension(client) -> None:
    meta = client.get_server_metadata()
    assert meta == {"name": "detr-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


def test_model_metadata_lists_tensors_and_padding(client) -> None:
    meta = client.get_model_metadata(MODEL)
    assert client.get_model_metadata(MODEL, "1") == meta
    assert (meta["name"], meta["versions"], meta["platform"]) == (
        MODEL,
        ["1"],
        "onnxruntime_onnx",  # the default backend (auto) on the CPU
    )
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("images", "BYTES", [-1])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("boxes", "FP32", [-1, -1, 4]),
        ("scores", "FP32", [-1, -1]),
        ("labels", "INT64", [-1, -1]),
        ("num_detections", "INT32", [-1]),
    ]
    assert "score 0, label -1" in meta["parameters"]["description"]
    assert meta["parameters"]["labels"] == {str(i): n for i, n in enumerate(LABELS)}


def test_binary_infer_of_several_images_equals_v1_detect(client, server) -> None:
    images = [shapes_image(320, 240), shapes_image(200, 500, "PNG", seed=3), ascii_bmp()]
    before = _metric(server, "detr_serve_images_total")
    result = client.infer(
        MODEL, [images_input(images)], parameters={"max_detections": K}, request_id="req-1"
    )
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "req-1"
    # tritonclient asked for binary outputs: the JSON header only says how many bytes each has.
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert_same_as_v1(result, v1_detect(server, images, max_detections=K), K)
    # v2 and v1 share the service, so its metrics count both (3 images here, 3 for v1).
    assert _metric(server, "detr_serve_images_total") == before + 6


def test_json_outputs_for_binary_inputs_hold_only_the_requested_tensors(client, server) -> None:
    images = [shapes_image(320, 240)]
    outputs = [
        httpclient.InferRequestedOutput("scores", binary_data=False),
        httpclient.InferRequestedOutput("num_detections", binary_data=False),
    ]
    result = client.infer(
        MODEL,
        [images_input(images)],
        outputs=outputs,
        parameters={"max_detections": 10, "threshold": 0.0},
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["scores", "num_detections"]
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    assert result.as_numpy("boxes") is None
    v1 = v1_detect(server, images, max_detections=10)
    expected = [d["score"] for d in v1[0]["detections"]]
    got = result.as_numpy("scores")[0, : len(expected)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)  # v1 rounds to 5 decimals
    assert result.as_numpy("num_detections").tolist() == [len(expected)]


def test_json_inputs_work_for_utf8_images_and_match_v1(client, server) -> None:
    bmp = ascii_bmp()
    result = client.infer(
        MODEL, [images_input([bmp], binary=False)], parameters={"max_detections": K}
    )
    assert_same_as_v1(result, v1_detect(server, [bmp], max_detections=K), K)


def test_json_inputs_take_base64_images_and_match_v1(client, server) -> None:
    # tritonclient's JSON mode sends BYTES as text: base64 text of JPEG/PNG is decoded.
    images = [shapes_image(320, 240), shapes_image(200, 300, "PNG", seed=2)]
    encoded = [base64.b64encode(image) for image in images]
    result = client.infer(
        MODEL, [images_input(encoded, binary=False)], parameters={"max_detections": K}
    )
    assert_same_as_v1(result, v1_detect(server, images, max_detections=K), K)


def test_json_text_that_is_neither_image_nor_base64_is_a_400(client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [images_input([b"hello, not base64!"], binary=False)])
    assert caught.value.status() == "400"
    assert "image 0: " in caught.value.message()
    assert "must be base64 text" in caught.value.message()


def test_jpeg_over_json_is_refused_by_the_client_and_by_the_server(server) -> None:
    jpeg = shapes_image()
    # tritonclient will not put non-UTF-8 bytes in JSON ...
    with pytest.raises(InferenceServerException, match="binary_data=True"):
        images_input([jpeg], binary=False)
    # ... and a client that does anyway gets a 400 that says what to do instead.
    head = b'{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["'
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=head + jpeg + b'"]}]}')
    assert r.status_code == 400
    assert "not valid UTF-8" in r.json()["error"]
    assert "binary tensor data extension" in r.json()["error"]


def test_gzip_request_and_versioned_infer_work(client) -> None:
    result = client.infer(
        MODEL,
        [images_input([shapes_image()])],
        model_version="1",
        request_compression_algorithm="gzip",
        parameters={"max_detections": 3, "classes": "circle,star"},
    )
    assert result.as_numpy("labels").shape == (1, 3)
    assert set(result.as_numpy("labels")[0].tolist()) <= {0, 3, -1}


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda c: c.infer("no-such-model", [images_input([b"x"])]), "unknown model 'no-such"),
        (
            lambda c: c.infer(MODEL, [images_input([b"x"])], model_version="2"),
            "unknown version '2' of model 'tiny'; its only version is '1'",
        ),
        (lambda c: c.get_model_metadata("no-such-model"), "this server serves 'tiny'"),
    ],
    ids=["infer", "infer-version", "metadata"],
)
def test_unknown_model_is_a_404_exception(client, call, text) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == "404"
    assert text in caught.value.message()


def test_corrupt_image_is_a_400_naming_it(client, server) -> None:
    images = [shapes_image(), shapes_image()[:1500], b"not an image"]
    before = _metric(server, 'detr_serve_batches_total{outcome="ok"}')
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [images_input(images)])
    assert caught.value.status() == "400"
    assert re.search(r"image [12]: ", caught.value.message()), caught.value.message()
    assert _metric(server, 'detr_serve_batches_total{outcome="ok"}') == before


@pytest.mark.parametrize(
    ("parameters", "outputs", "text"),
    [
        ({"threshold": 2}, None, "parameters.threshold: Input should be less than or equal to 1"),
        ({"classes": "unicorn"}, None, "unknown class 'unicorn'"),
        ({}, [httpclient.InferRequestedOutput("logits")], "unknown output 'logits'"),
    ],
    ids=["threshold", "class", "output"],
)
def test_bad_parameters_are_a_400_exception(client, parameters, outputs, text) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer(
            MODEL, [images_input([shapes_image()])], parameters=parameters, outputs=outputs
        )
    assert caught.value.status() == "400"
    assert text in caught.value.message()


def test_errors_have_the_protocol_shape(server) -> None:
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{", timeout=30)
    assert r.status_code == 400
    assert r.json() == {
        "error": "the inference request header is not valid JSON: Expecting "
        "property name enclosed in double quotes at byte 1"
    }
    r = httpx.get(f"{server.url}/v2/models/other/ready")
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'other'; this server serves 'tiny'"}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


def _metric(server: RunningServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_metadata_json_is_plain_json(server) -> None:
    r = httpx.get(f"{server.url}/v2/models/{MODEL}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert json.loads(r.content)["name"] == MODEL
