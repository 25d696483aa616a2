"""Typed errors of the service; the API turns each into its status code and a JSON body.
Also the one formatter of pydantic's validation errors (API messages and the CLI's lines);
no web framework here, so the CLI imports it without FastAPI."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class ApiError(Exception):
    """An error a client should see: HTTP status, a short type, and a message naming the input."""

    status_code = 400
    error_type = "invalid_request"

    def __init__(
        self, message: str, *, image_index: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        if image_index is not None:
            message = f"image {image_index}: {message}"
        super().__init__(message)
        self.message = message
        self.image_index = image_index
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"type": self.error_type, "message": self.message}
        if self.image_index is not None:
            error["image_index"] = self.image_index
        return {"error": error}


class UnknownModelError(ApiError):
    status_code = 404
    error_type = "not_found"


class InvalidRequestError(ApiError):
    status_code = 400
    error_type = "invalid_request"


class ValidationFailedError(ApiError):
    status_code = 422
    error_type = "validation_error"


class InvalidImageError(ApiError):
    status_code = 400
    error_type = "invalid_image"


class ImageTooLargeError(ApiError):
    status_code = 413
    error_type = "image_too_large"


class PayloadTooLargeError(ApiError):
    status_code = 413
    error_type = "payload_too_large"


class FetchError(ApiError):
    status_code = 400
    error_type = "fetch_failed"


class UrlRefusedError(ApiError):
    status_code = 400
    error_type = "url_refused"


class InvalidUrlError(ApiError):
    status_code = 400
    error_type = "invalid_url"


class QueueFullApiError(ApiError):
    status_code = 429
    error_type = "queue_full"


class UnavailableError(ApiError):
    status_code = 503
    error_type = "unavailable"


class ModelLoadFailedError(UnavailableError):
    """The model could not be loaded (--no-exit-on-load-failure): retrying will not help."""

    error_type = "model_load_failed"


class DeadlineError(ApiError):
    status_code = 504
    error_type = "deadline_exceeded"


class InferenceError(ApiError):
    status_code = 500
    error_type = "inference_failed"


def describe_error(
    error: ErrorDetails, *, prefix: str = "", where: str | None = None, plain: bool = False
) -> str:
    """One of pydantic's errors as `where: what`. `where` is the dotted path of the field in
    the input (`body` for the input as a whole) after `prefix`, unless the caller names the
    place itself (the CLI: a flag and its variable); `plain` drops the "Value error, " pydantic
    puts before a validator's own sentence."""
    if where is None:
        where = prefix + (".".join(str(p) for p in error["loc"]) or "body")
    message = error["msg"].removeprefix("Value error, ") if plain else error["msg"]
    return f"{where}: {message}"


def describe_validation(errors: Iterable[ErrorDetails], *, prefix: str = "") -> str:
    """Every error of a failed validation, `where: what` each, joined by "; " (the message of
    the 400 or 422 a client gets)."""
    return "; ".join(describe_error(error, prefix=prefix) for error in errors)
