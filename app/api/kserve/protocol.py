"""KServe Open Inference Protocol v2: its messages. The request's JSON header and the parsed
request (REST and gRPC alike), and the bodies of the metadata, health and error answers (the
OpenAPI document is built from these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidRequestError, describe_validation
from app.options import DetectOptions

MODEL_VERSION = "1"


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


def validate_header(parsed: dict[str, Any]) -> InferRequestHeader:
    """The inference request's header from plain values (parsed JSON, or a gRPC message's
    fields), refused with the protocol's field names when it does not fit."""
    try:
        return InferRequestHeader.model_validate(parsed)
    except ValidationError as exc:
        raise InvalidRequestError(
            "the inference request does not match the protocol: "
            + describe_validation(exc.errors())
        ) from None


# --- answers ----------------------------------------------------------------------------


class ProtocolError(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


# Triton's model repository extension (repository.py).


class IndexEntry(BaseModel):
    name: str
    version: str = "1"
    state: str
    reason: str = ""


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ready: bool = False


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    parameters: dict[str, Any] = {}


def error_body(message: str) -> dict[str, str]:
    return {"error": message}
