"""v2 request parameters -> the detector's options (threshold, max_detections, classes,
tiling), refused with a message naming the parameter; the parameters tritonclient and Triton
reserve are accepted and ignored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from app.errors import InvalidRequestError, ValidationFailedError, describe_validation
from app.options import DetectOptions

# Request parameters that tritonclient and Triton reserve: accepted and ignored here (the
# server's own deadline and batcher apply), so that stock clients work unchanged.
_RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "content_type",
    }
)
_OPTION_PARAMETERS = ("threshold", "max_detections", "classes", "tiling")


def detect_options(parameters: Mapping[str, Any]) -> DetectOptions:
    """The options of a request's parameters (REST and gRPC alike)."""
    unknown = [
        k
        for k in parameters
        if k not in _OPTION_PARAMETERS
        and k not in _RESERVED_PARAMETERS
        and not k.startswith("triton_")
    ]
    if unknown:
        raise InvalidRequestError(
            f"unknown request parameter {unknown[0]!r}; this model takes "
            + ", ".join(_OPTION_PARAMETERS)
        )
    values: dict[str, Any] = {}
    for key in ("threshold", "max_detections"):
        value = parameters.get(key)
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise InvalidRequestError(f"parameters.{key} must be a number, got {value!r}")
        if key == "max_detections" and isinstance(value, float):
            if not value.is_integer():
                raise InvalidRequestError(
                    f"parameters.max_detections must be an integer, got {value}"
                )
            value = int(value)
        values[key] = value
    values["classes"] = _classes(parameters.get("classes"))
    values["tiling"] = parameters.get("tiling")
    try:
        return DetectOptions.model_validate(values)
    except ValidationError as exc:
        message = describe_validation(exc.errors(), prefix="parameters.")
        if any(err["loc"][:1] == ("tiling",) for err in exc.errors()):
            raise ValidationFailedError(message) from None  # 422, as on /v1
        raise InvalidRequestError(message) from None


def _classes(value: Any) -> list[str | int] | None:
    """Parameters are scalars in the protocol, so a list of classes comes as 'circle,star'."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"parameters.classes must be names or ids, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    if isinstance(value, list) and all(
        isinstance(c, str | int) and not isinstance(c, bool) for c in value
    ):
        return list(value)
    raise InvalidRequestError(
        f"parameters.classes must be a comma-separated string of names or ids, got {value!r}"
    )
