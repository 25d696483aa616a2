"""The v2 GRPCInferenceService RPCs: health, metadata and ModelInfer for the served model.

Thin, like the REST routes: messages become the protocol's request header (app/api/kserve/
request.py checks the input, options and outputs exactly as for REST), the images go through
the same DetectionService (batcher, pixel admission, deadlines, metrics), and the tensors come
back in `raw_output_contents`, as Triton sends them. Each RPC gets the HTTP routes' request id,
API key rule, metrics and access log (`_rpc`). The RPCs of Triton's proto that this server does
not serve (statistics, shared memory, streaming) answer UNIMPLEMENTED, from the generated base
class.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from app.api.http.middleware import API_KEY_MESSAGE, bearer_matches, client_request_id
from app.api.kserve import repository, tensors
from app.api.kserve.binary import deserialize_bytes
from app.api.kserve.protocol import MODEL_VERSION, InferRequest, RequestedOutput, validate_header
from app.api.kserve.request import infer_request, the_input
from app.api.kserve.tensors import INPUT_NAME, OUTPUTS
from app.errors import ApiError, InvalidRequestError, UnavailableError, UnknownModelError
from app.logging_setup import request_id_var
from app.process.runtime import Runtime
from app.service import DetectionService, ImageSource

logger = logging.getLogger(__name__)

# The HTTP status of each typed error, as a gRPC code (the mapping of the gRPC-HTTP spec, with
# 413 as RESOURCE_EXHAUSTED, gRPC's own code for "message larger than max").
_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Handler = Callable[["KServeServicer", _Request, grpc.aio.ServicerContext], Awaitable[_Response]]


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _rpc(
    name: str, *, open_to_all: bool = False
) -> Callable[[_Handler[_Request, _Response]], _Handler[_Request, _Response]]:
    """Request id (the client's `x-request-id` metadata when sane, echoed back), the API key
    (`authorization: Bearer <key>` metadata; health RPCs are `open_to_all`, as /v2/health/* are),
    typed errors as status codes, one metric and one log line per call."""

    def wrap(method: _Handler[_Request, _Response]) -> _Handler[_Request, _Response]:
        @functools.wraps(method)
        async def call(
            self: KServeServicer, request: _Request, context: grpc.aio.ServicerContext
        ) -> _Response:
            started = time.perf_counter()
            metadata = _metadata(context)
            request_id = client_request_id(metadata.get("x-request-id"))
            token = request_id_var.set(request_id)
            code, message = grpc.StatusCode.OK, ""
            trailing: tuple[tuple[str, str], ...] = ()
            try:
                await context.send_initial_metadata((("x-request-id", request_id),))
                if not open_to_all and not self.authorized(metadata.get("authorization")):
                    raise _Refused(grpc.StatusCode.UNAUTHENTICATED, API_KEY_MESSAGE)
                return await method(self, request, context)
            except _Refused as exc:
                code, message = exc.code, exc.message
            except ApiError as exc:
                code, message = _CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN), exc.message
                trailing = tuple((k.lower(), v) for k, v in exc.headers.items())
            except asyncio.CancelledError:
                # gRPC cancels the handler when the client cancels or its deadline passes.
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception:
                logger.exception("unhandled error in %s", name)
                code, message = grpc.StatusCode.INTERNAL, "internal server error"
            finally:
                elapsed = time.perf_counter() - started
                self.runtime.metrics.grpc_requests.labels(name, code.name).inc()
                self.runtime.metrics.grpc_latency.labels(name).observe(elapsed)
                level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    level = logging.WARNING
                logger.log(level, "gRPC %s -> %s in %.1f ms", name, code.name, elapsed * 1e3)
                request_id_var.reset(token)
            await context.abort(code, message, trailing)  # raises: the call ends here
            raise AssertionError("unreachable")

        return call

    return wrap


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Runtime, version: str) -> None:
        self.runtime = runtime
        self.version = version
        key = runtime.settings.api_key
        self._api_key = key.get_secret_value().encode() if key is not None else None

    def authorized(self, authorization: str | None) -> bool:
        return self._api_key is None or bearer_matches(authorization, self._api_key)

    @_rpc("ServerLive", open_to_all=True)
    async def ServerLive(  # noqa: N802 (the protocol's method names)
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc("ServerReady", open_to_all=True)
    async def ServerReady(  # noqa: N802
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.state == "ready")

    @_rpc("ModelReady")
    async def ModelReady(  # noqa: N802
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        runtime = self.runtime
        if runtime.router is not None:
            router = runtime.router
            ready = request.name in router.models and router.state(request.name)[0] == "ready"
            return pb.ModelReadyResponse(ready=ready and not runtime.draining)
        served = (
            runtime.service.info.name if runtime.service else runtime.settings.served_model_name
        )
        try:
            tensors.check_model(served, request.name, request.version or None)
        except UnknownModelError:
            return pb.ModelReadyResponse(ready=False)  # as Triton: not an error, not ready
        return pb.ModelReadyResponse(ready=runtime.state == "ready")

    @_rpc("ServerMetadata")
    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**tensors.server_metadata(self.version))

    @_rpc("ModelMetadata")
    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        service = self._service(request.name)
        info = service.info
        tensors.check_model(info.name, request.name, request.version or None)
        meta = tensors.model_metadata(
            name=info.name,
            backend=info.backend,
            labels=info.labels,
            default_threshold=service.settings.default_threshold,
            default_max_detections=service.settings.default_max_detections,
        )
        # The message has no parameters: labels and the outputs' description are on REST's
        # /v2/models/{name}.
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[_tensor_metadata(t) for t in meta["inputs"]],
            outputs=[_tensor_metadata(t) for t in meta["outputs"]],
        )

    @_rpc("ModelInfer")
    async def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if self.runtime.router is not None:
            service = await self.runtime.inference_service(request.model_name)
        else:
            service = self._service(request.model_name)
        if self.runtime.draining:
            # As the HTTP inference routes (app/api/http/deps.py): accepted calls finish, new go
            # to another replica.
            raise UnavailableError("the server is shutting down (draining); retry elsewhere")
        tensors.check_model(service.info.name, request.model_name, request.model_version or None)
        parsed = parse_infer_request(request, service.settings.max_images_per_request)
        # Counted as open like an HTTP inference request: the drain waits for it.
        self.runtime.request_started()
        try:
            result = await service.detect(
                [ImageSource(raw=b) for b in parsed.images],
                parsed.options,
                timeout_s=context.time_remaining(),
            )
        finally:
            self.runtime.request_finished()
        k = parsed.options.max_detections or service.settings.default_max_detections
        return infer_response(
            model_name=service.info.name,
            request_id=parsed.id,
            tensors=tensors.v2_tensors(result, k),
            outputs=parsed.outputs,
        )

    def _service(self, name: str) -> DetectionService:
        if self.runtime.router is not None:
            return self.runtime.service_for(name)
        if self.runtime.service is None:
            raise UnavailableError("the model is still loading; poll ServerReady")
        return self.runtime.service

    # Triton's model repository extension, through the same control path as HTTP's
    # /v2/repository routes (app/api/kserve/repository.py).
    @_rpc("RepositoryIndex")
    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = await repository.index_entries(self.runtime, request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    @_rpc("RepositoryModelLoad")
    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await repository.load_model(self.runtime, request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_rpc("RepositoryModelUnload")
    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await repository.unload_model(self.runtime, request.model_name, list(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def parse_infer_request(request: pb.ModelInferRequest, max_images: int) -> InferRequest:
    """The parsed request from the message: images from the input's `contents.bytes_contents`
    or from `raw_input_contents` (length-prefixed, as in REST's binary extension)."""
    header = validate_header(
        {
            "id": request.id or None,
            "parameters": _parameters(request.parameters),
            "inputs": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "datatype": t.datatype,
                    "parameters": _parameters(t.parameters),
                }
                for t in request.inputs
            ],
            "outputs": [
                {"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs
            ]
            or None,
        }
    )
    _, count = the_input(header, max_images)
    tensor = request.inputs[0]
    other = [f.name for f, _ in tensor.contents.ListFields() if f.name != "bytes_contents"]
    if other:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r} is BYTES: its images go in contents.bytes_contents or "
            f"raw_input_contents, not in {other[0]}"
        )
    elements = tensor.contents.bytes_contents
    raw = request.raw_input_contents
    if elements and raw:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r} has both contents.bytes_contents and "
            "raw_input_contents: send one"
        )
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidRequestError(
                f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} input"
            )
        images = deserialize_bytes(raw[0], count)
    elif len(elements) != count:
        raise InvalidRequestError(
            f"input {INPUT_NAME!r}: the shape says {count} elements but "
            f"contents.bytes_contents holds {len(elements)}"
            + ("" if elements else " (and there is no raw_input_contents)")
        )
    else:
        images = list(elements)
    return infer_request(header, images, images_from_json=False)


def infer_response(
    *,
    model_name: str,
    request_id: str | None,
    tensors: Mapping[str, np.ndarray],
    outputs: list[RequestedOutput],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=request_id or ""
    )
    for out in outputs:
        spec = OUTPUTS[out.name]
        array = np.ascontiguousarray(tensors[out.name], dtype=spec.dtype)
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """InferParameter maps as plain values (each holds one of bool, int, string, double)."""
    values: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        values[key] = getattr(param, choice) if choice is not None else None
    return values


def _tensor_metadata(tensor: Mapping[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
    )


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # binary (-bin) entries are not ours
            values.setdefault(key.lower(), value)
    return values
