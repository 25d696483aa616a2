"""The gRPC servicer on its own: messages built as tritonclient.grpc builds them, a fake
context and a fake service (no server, no model)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb

from app.api.kserve.grpc.servicer import KServeServicer, infer_response, parse_infer_request
from app.api.kserve.protocol import RequestedOutput
from app.api.kserve.tensors import OUTPUTS
from app.config import Settings
from app.engine.tasks import ImageDetections
from app.errors import InvalidRequestError, QueueFullApiError
from app.metrics import Metrics
from app.service import AnsweredImage, DetectResult

MAX_IMAGES = 16


def triton_request(images: list[bytes], **kwargs: Any) -> pb.ModelInferRequest:
    """The ModelInferRequest that tritonclient.grpc sends (raw_input_contents)."""
    tensor = grpcclient.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    from tritonclient.grpc._utils import _get_inference_request

    defaults: dict[str, Any] = {
        "model_name": "tiny",
        "inputs": [tensor],
        "model_version": "",
        "request_id": "",
        "outputs": None,
        "sequence_id": 0,
        "sequence_start": False,
        "sequence_end": False,
        "priority": 0,
        "timeout": None,
        "parameters": None,
    }
    return _get_inference_request(**(defaults | kwargs))


def test_raw_input_contents_and_bytes_contents_give_the_same_request() -> None:
    images = [b"\xff\xd8\xffjpeg", b"\x89PNG\r\n\x1a\npng"]
    raw = parse_infer_request(
        triton_request(images, parameters={"threshold": 0.25, "classes": "circle"}), MAX_IMAGES
    )
    message = pb.ModelInferRequest(model_name="tiny")
    tensor = message.inputs.add(name="images", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend(images)
    message.parameters["threshold"].double_param = 0.25
    message.parameters["classes"].string_param = "circle"
    contents = parse_infer_request(message, MAX_IMAGES)
    assert raw.images == contents.images == images
    assert raw.options == contents.options
    assert raw.options.threshold == 0.25 and raw.options.classes == ["circle"]
    assert [o.name for o in raw.outputs] == list(OUTPUTS)


@pytest.mark.parametrize(
    ("mutate", "text"),
    [
        (lambda m: m.inputs[0].contents.bytes_contents.append(b"x"), "send one"),
        (lambda m: m.raw_input_contents.append(b""), "raw_input_contents holds 2 entries"),
        (lambda m: m.inputs[0].contents.fp32_contents.append(1.0), "not in fp32_contents"),
        (lambda m: m.parameters["tiles"].bool_param, "unknown request parameter 'tiles'"),
        (lambda m: m.outputs.add(name="logits"), "unknown output 'logits'"),
        (lambda m: m.inputs[0].shape.append(3), "must have shape [N] or [N, 1]"),
    ],
    ids=["both-contents", "raw-count", "other-contents", "parameter", "output", "shape"],
)
def test_malformed_messages_are_refused_with_their_field(mutate, text) -> None:
    message = triton_request([b"\xff\xd8\xffjpeg"])
    mutate(message)
    with pytest.raises(InvalidRequestError, match=None) as caught:
        parse_infer_request(message, MAX_IMAGES)
    assert text in caught.value.message


def test_response_tensors_are_read_back_by_tritonclient() -> None:
    detections = ImageDetections(
        scores=np.array([0.9], dtype=np.float32),
        labels=np.array([2], dtype=np.int64),
        boxes=np.array([[1, 2, 3, 4]], dtype=np.float32),
        batch_size=1,
        inference_s=0.0,
        postprocess_s=0.0,
    )
    from app.api.kserve.tensors import v2_tensors

    result = DetectResult("tiny", [AnsweredImage(10, 10, detections, {})])
    outputs = [RequestedOutput("labels", True), RequestedOutput("boxes", True)]
    response = infer_response(
        model_name="tiny", request_id="r", tensors=v2_tensors(result, 3), outputs=outputs
    )
    read = grpcclient.InferResult(response)
    assert read.as_numpy("labels").tolist() == [[2, -1, -1]]
    assert read.as_numpy("boxes")[0, 0].tolist() == [1, 2, 3, 4]
    assert read.as_numpy("scores") is None


class FakeContext:
    def __init__(self, remaining: float | None, metadata: tuple = ()) -> None:
        self.remaining = remaining
        self.metadata = metadata
        self.sent: tuple = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: tuple = ()

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def time_remaining(self) -> float | None:
        return self.remaining

    async def send_initial_metadata(self, metadata: tuple) -> None:
        self.sent = metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self.aborted = (code, details)
        self.trailing = trailing
        raise grpc.aio.AbortError()


class FakeService:
    def __init__(self, settings: Settings, error: Exception | None = None) -> None:
        self.settings = settings
        self.info = SimpleNamespace(name="tiny")
        self.error = error
        self.timeouts: list[float | None] = []

    async def detect(self, sources: list, options: Any, *, timeout_s: float | None) -> Any:
        self.timeouts.append(timeout_s)
        if self.error is not None:
            raise self.error
        return DetectResult("tiny", [])


class FakeRuntime(SimpleNamespace):
    """What the servicer reads of app.process.runtime.Runtime: the service, the drain and its count,
    and no model router (one model)."""

    def __init__(self, settings: Settings, service: FakeService) -> None:
        super().__init__(settings=settings, metrics=Metrics(), service=service, router=None)
        self.draining = False
        self.open_requests = 0
        self.most_open = 0

    def request_started(self) -> None:
        self.open_requests += 1
        self.most_open = max(self.most_open, self.open_requests)

    def request_finished(self) -> None:
        self.open_requests -= 1


def servicer(tiny_model_dir, error: Exception | None = None, **settings: Any) -> KServeServicer:
    s = Settings(model=tiny_model_dir, model_name="tiny", **settings)
    runtime = FakeRuntime(s, FakeService(s, error))
    return KServeServicer(runtime, "0.1.0")  # type: ignore[arg-type]


async def test_model_infer_counts_as_open_for_the_drain_and_is_refused_while_draining(
    tiny_model_dir,
) -> None:
    svc = servicer(tiny_model_dir)
    await svc.ModelInfer(triton_request([b"\xff\xd8\xffjpeg"]), FakeContext(None))
    assert (svc.runtime.most_open, svc.runtime.open_requests) == (1, 0)
    svc.runtime.draining = True
    context = FakeContext(None)
    with pytest.raises(grpc.aio.AbortError):
        await svc.ModelInfer(triton_request([b"\xff\xd8\xffjpeg"]), context)
    assert context.aborted is not None
    code, details = context.aborted
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "draining" in details


async def test_the_grpc_deadline_reaches_the_service(tiny_model_dir) -> None:
    svc = servicer(tiny_model_dir)
    await svc.ModelInfer(triton_request([b"\xff\xd8\xffjpeg"]), FakeContext(2.5))
    await svc.ModelInfer(triton_request([b"\xff\xd8\xffjpeg"]), FakeContext(None))
    assert svc.runtime.service.timeouts == [2.5, None]


async def test_typed_errors_become_status_codes_with_retry_metadata(tiny_model_dir) -> None:
    full = QueueFullApiError("the queue is full", headers={"Retry-After": "2"})
    svc = servicer(tiny_model_dir, error=full)
    context = FakeContext(None, metadata=(("x-request-id", "abc"),))
    with pytest.raises(grpc.aio.AbortError):
        await svc.ModelInfer(triton_request([b"\xff\xd8\xffjpeg"]), context)
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "the queue is full")
    assert context.trailing == (("retry-after", "2"),)
    assert context.sent == (("x-request-id", "abc"),)
    sample = svc.runtime.metrics.registry.get_sample_value(
        "detr_serve_grpc_requests_total", {"method": "ModelInfer", "code": "UNAVAILABLE"}
    )
    assert sample == 1


async def test_api_key_rule_matches_http(tiny_model_dir) -> None:
    svc = servicer(tiny_model_dir, api_key="k")
    for metadata in ((), (("authorization", "Bearer x"),), (("authorization", "k"),)):
        context = FakeContext(None, metadata=metadata)
        with pytest.raises(grpc.aio.AbortError):
            await svc.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), context)
        assert context.aborted is not None
        assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    live = await svc.ServerLive(pb.ServerLiveRequest(), FakeContext(None))
    assert live.live is True  # health is open to all, as /v2/health/live
    ok = FakeContext(None, metadata=(("authorization", "BEARER k"),))
    assert (await svc.ModelReady(pb.ModelReadyRequest(name="other"), ok)).ready is False
