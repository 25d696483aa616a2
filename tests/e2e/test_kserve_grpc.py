"""End to end: the KServe v2 gRPC endpoint of the real server, driven by the stock
tritonclient.grpc, with an API key and a small message limit."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from scripts.bench.serverproc import RunningServer
from scripts.checks import chaos
from tests.conftest import shapes_image
from tests.e2e.test_kserve import (
    MODEL,
    K,
    ascii_bmp,
    assert_same_as_v1,
    tiny_server_args,
    v1_detect,
)

pytestmark = pytest.mark.e2e

KEY = "grpc-secret"
AUTH = {"authorization": f"Bearer {KEY}"}

MAX_UPLOAD = 1 << 20
MAX_REQUEST_PIXELS = 500_000


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    srv = RunningServer(
        [
            *tiny_server_args(tiny_model_dir),
            *("--max-upload-bytes", str(MAX_UPLOAD)),
            *("--max-request-pixels", str(MAX_REQUEST_PIXELS)),
        ],
        env={"DETR_SERVE_TORCH_THREADS": "1", "DETR_SERVE_API_KEY": KEY},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def images_input(images: list[bytes]) -> grpcclient.InferInput:
    """tritonclient.grpc puts BYTES in raw_input_contents (length-prefixed elements)."""
    tensor = grpcclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def bytes_contents_request(images: list[bytes], **parameters: object) -> object:
    """The same request with the images in the input's contents.bytes_contents, as other
    clients of the protocol send them (tritonclient has no option for it)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL, id="bc-1")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
    tensor.contents.bytes_contents.extend(images)
    for key, value in parameters.items():
        if isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


def v1(server: RunningServer, images: list[bytes]) -> list[dict]:
    return v1_detect(server, images, headers=AUTH, max_detections=K)


def grpc_metric(server: RunningServer, method: str, code: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    prefix = f'detr_serve_grpc_requests_total{{code="{code}",method="{method}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_health_and_metadata_answer_tritonclient(client) -> None:
    # Health needs no key (as /v2/health/*); the rest does.
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=AUTH)
    assert client.is_model_ready(MODEL, "1", headers=AUTH)
    assert not client.is_model_ready("no-such-model", headers=AUTH)
    assert not client.is_model_ready(MODEL, "2", headers=AUTH)
    meta = client.get_server_metadata(headers=AUTH, as_json=True)
    assert meta == {"name": "detr-serve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    model = client.get_model_metadata(MODEL, headers=AUTH, as_json=True)
    assert (model["name"], model["versions"], model["platform"]) == (
        MODEL,
        ["1"],
        "onnxruntime_onnx",  # the default backend (auto) on the CPU
    )
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("images", "BYTES", ["-1"])  # int64 shapes: as_json renders them as strings
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [
        ("boxes", "FP32", ["-1", "-1", "4"]),
        ("scores", "FP32", ["-1", "-1"]),
        ("labels", "INT64", ["-1", "-1"]),
        ("num_detections", "INT32", ["-1"]),
    ]


def test_raw_input_contents_give_the_boxes_of_v1_detect(client, server) -> None:
    images = [shapes_image(320, 240), shapes_image(200, 500, "PNG", seed=3), ascii_bmp()]
    before = grpc_metric(server, "ModelInfer", "OK")
    result = client.infer(
        MODEL,
        [images_input(images)],
        parameters={"max_detections": K},
        request_id="req-1",
        headers=AUTH,
    )
    response = result.get_response()
    assert response.model_name == MODEL and response.id == "req-1"
    assert response.model_version == "1"
    assert_same_as_v1(result, v1(server, images), K)
    assert grpc_metric(server, "ModelInfer", "OK") == before + 1


def test_bytes_contents_give_the_same_boxes(client, server) -> None:
    images = [shapes_image(300, 200, seed=5), shapes_image(128, 128, "WEBP", seed=1)]
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        from tritonclient.grpc import service_pb2_grpc as pb_grpc

        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(
            bytes_contents_request(images, max_detections=K), metadata=list(AUTH.items())
        )
    finally:
        channel.close()
    assert response.id == "bc-1"
    assert_same_as_v1(grpcclient.InferResult(response), v1(server, images), K)


def test_requested_outputs_and_options_apply(client) -> None:
    result = client.infer(
        MODEL,
        [images_input([shapes_image()])],
        outputs=[grpcclient.InferRequestedOutput("labels")],
        parameters={"max_detections": 3, "classes": "circle,star"},
        model_version="1",
        headers=AUTH,
    )
    assert [o.name for o in result.get_response().outputs] == ["labels"]
    assert result.as_numpy("boxes") is None
    assert result.as_numpy("labels").shape == (1, 3)
    assert set(result.as_numpy("labels")[0].tolist()) <= {0, 3, -1}


def test_api_key_is_required_and_checked(client, server) -> None:
    before = grpc_metric(server, "ModelInfer", "UNAUTHENTICATED")
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [images_input([shapes_image()])], headers=headers)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "Authorization: Bearer <key>" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata(MODEL)
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    assert grpc_metric(server, "ModelInfer", "UNAUTHENTICATED") == before + 3
    # The scheme is case-insensitive, as over HTTP.
    assert client.is_model_ready(MODEL, headers={"authorization": f"bearer {KEY}"})


@pytest.mark.parametrize(
    ("call", "code", "text"),
    [
        (
            lambda c: c.infer(MODEL, [images_input([b"not an image"])], headers=AUTH),
            "INVALID_ARGUMENT",
            r"image 0: ",
        ),
        (
            lambda c: c.infer(
                MODEL,
                [images_input([shapes_image()])],
                parameters={"threshold": 2.0},
                headers=AUTH,
            ),
            "INVALID_ARGUMENT",
            r"parameters\.threshold: Input should be less than or equal to 1",
        ),
        (
            lambda c: c.infer(MODEL, [grpcclient.InferInput("pixels", [1], "FP32")], headers=AUTH),
            "INVALID_ARGUMENT",
            r"this model takes one input, 'images' \(BYTES, encoded images\); got 'pixels'",
        ),
        (
            lambda c: c.infer(MODEL, [images_input([shapes_image()] * 17)], headers=AUTH),
            "INVALID_ARGUMENT",
            r"17 elements, over the limit of 16 images per request",
        ),
        (
            lambda c: c.infer("no-such-model", [images_input([b"x"])], headers=AUTH),
            "NOT_FOUND",
            r"unknown model 'no-such-model'; this server serves 'tiny'",
        ),
        (
            lambda c: c.get_model_metadata(MODEL, "2", headers=AUTH),
            "NOT_FOUND",
            r"unknown version '2' of model 'tiny'",
        ),
    ],
    ids=["bad-image", "threshold", "input-name", "too-many-images", "model", "version"],
)
def test_bad_requests_get_clear_status_codes(client, call, code, text) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == f"StatusCode.{code}"
    assert re.search(text, caught.value.message()), caught.value.message()


def test_bytes_contents_count_must_match_the_shape(server) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.append(shapes_image())
    with grpc.insecure_channel(server.grpc_url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=list(AUTH.items())
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the shape says 2 elements but contents.bytes_contents holds 1" in (
        caught.value.details()
    )


def test_message_over_the_upload_limit_is_resource_exhausted(client) -> None:
    big = shapes_image() + bytes(MAX_UPLOAD)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [images_input([big])], headers=AUTH)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert str(MAX_UPLOAD) in caught.value.message()


def test_pixels_over_the_request_budget_are_resource_exhausted(client) -> None:
    png = shapes_image(1000, 600, "PNG")  # 600,000 pixels: PNGs decode at full size
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [images_input([png])], headers=AUTH)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"over the limit of {MAX_REQUEST_PIXELS} pixels per request" in (caught.value.message())


def test_full_queue_is_unavailable() -> None:
    """A queue filled by live work refuses the next call at once, with the retry hint of
    HTTP's 429 in the trailing metadata. A slow null engine holds one image in its forward
    pass (60 s per batch) while two wait in a queue of two."""
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    server = chaos.start(
        *("--workers", "1", "--null-batch-ms", "60000", "--max-batch-size", "1"),
        *("--max-queue-size", "2", "--max-images-per-request", "2"),
        *("--request-timeout-s", "120", "--drain-timeout-s", "1", "--model-name", MODEL),
    )
    blocking = ThreadPoolExecutor(2)
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as filler:
            # One image goes into the forward pass, then two fill the queue.
            blocking.submit(filler.infer, MODEL, [images_input([shapes_image()])])
            assert until_sync(lambda: chaos.metric(server, "detr_serve_inflight_images") >= 1)
            blocking.submit(filler.infer, MODEL, [images_input([shapes_image()] * 2)])
            assert until_sync(lambda: chaos.metric(server, "detr_serve_queue_depth") == 2)
            before = grpc_metric(server, "ModelInfer", "UNAVAILABLE")
            with pytest.raises(InferenceServerException) as caught:
                filler.infer(MODEL, [images_input([shapes_image()])])
            assert caught.value.status() == "StatusCode.UNAVAILABLE"
            assert "queue" in caught.value.message().lower()
            assert grpc_metric(server, "ModelInfer", "UNAVAILABLE") == before + 1
            # Still inside: closing the filler's channel cancels its calls, emptying the queue.
            with grpc.insecure_channel(server.grpc_url) as channel:
                with pytest.raises(grpc.RpcError) as raw:
                    pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                        bytes_contents_request([shapes_image()])
                    )
            assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
            assert int(dict(raw.value.trailing_metadata())["retry-after"]) >= 1
    finally:
        server.stop()
        blocking.shutdown(wait=False, cancel_futures=True)


def until_sync(condition: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Wait for a state (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_request_id_metadata_is_echoed(server) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerLive.with_call(
            pb.ServerLiveRequest(), metadata=[("x-request-id", "trace-42")]
        )
        assert ("x-request-id", "trace-42") in call.initial_metadata()
        _, call = stub.ServerLive.with_call(pb.ServerLiveRequest())
        generated = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_a_grpc_port_in_use_stops_the_start_with_a_clear_message(tiny_model_dir) -> None:
    import socket
    import subprocess

    from scripts.bench.serverproc import detr_serve_command, free_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = subprocess.run(
            [
                *detr_serve_command(),
                "--model",
                str(tiny_model_dir),
                "--port",
                str(free_port()),
                "--grpc-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    assert f"the gRPC port {taken} on 127.0.0.1 is in use" in done.stderr + done.stdout


def test_sigterm_finishes_accepted_grpc_calls(tiny_model_dir) -> None:
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    srv = RunningServer(
        ["--model", str(tiny_model_dir), "--model-name", MODEL, "--max-batch-size", "1"],
        env={"DETR_SERVE_TORCH_THREADS": "1"},
    )
    clients = [grpcclient.InferenceServerClient(srv.grpc_url) for _ in range(4)]
    assert all(c.is_server_ready() for c in clients)  # connections up before the calls

    def infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
        result = client.infer(MODEL, [images_input([shapes_image()] * 16)], client_timeout=60)
        return result.as_numpy("num_detections")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(infer, c) for c in clients]
        time.sleep(0.5)
        code = srv.stop(signal.SIGTERM)
        counts = [f.result() for f in futures]
    for c in clients:
        c.close()
    assert code in (0, -signal.SIGTERM), srv.log()
    assert [len(c) for c in counts] == [16] * 4
    assert srv.leftovers == []
