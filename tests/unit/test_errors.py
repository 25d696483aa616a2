"""The one formatter of pydantic's validation errors (app/errors.py): the messages clients get
from /v1, v2 and the repository routes, and the CLI's lines."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from app.errors import describe_error, describe_validation


class Image(BaseModel):
    url: str


class Request(BaseModel):
    images: list[Image]
    threshold: float = 0.5

    @field_validator("threshold")
    @classmethod
    def _at_most_one(cls, value: float) -> float:
        if value > 1:
            raise ValueError("threshold is a score, at most 1")
        return value


def _errors(value: object) -> list:
    with pytest.raises(ValidationError) as caught:
        Request.model_validate(value)
    return caught.value.errors()


def test_each_error_is_its_dotted_path_and_message_joined_by_semicolons() -> None:
    errors = _errors({"images": [{"url": "a"}, {}], "threshold": "high"})
    assert describe_validation(errors) == (
        "images.1.url: Field required; threshold: Input should be a valid number, unable to "
        "parse string as a number"
    )


def test_an_error_of_the_whole_input_is_named_body() -> None:
    assert describe_validation(_errors([1])) == (
        "body: Input should be a valid dictionary or instance of Request"
    )


def test_a_prefix_places_the_fields_inside_a_parameter() -> None:
    errors = _errors({"images": []} | {"threshold": 2})
    assert describe_validation(errors, prefix="parameters.") == (
        "parameters.threshold: Value error, threshold is a score, at most 1"
    )
    assert describe_error(errors[0], prefix="tiling.") == (
        "tiling.threshold: Value error, threshold is a score, at most 1"
    )


def test_the_cli_names_the_place_itself_and_drops_pydantics_value_error() -> None:
    (error,) = _errors({"images": [], "threshold": 2})
    assert describe_error(error, where="--threshold / DETR_SERVE_THRESHOLD", plain=True) == (
        "--threshold / DETR_SERVE_THRESHOLD: threshold is a score, at most 1"
    )
