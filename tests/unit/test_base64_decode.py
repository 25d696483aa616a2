"""The base64 of JSON uploads is decoded by pybase64 with the standard library deciding whenever
pybase64 refuses: what is accepted, and the bytes it gives, must be base64.b64decode's
(validate=True) exactly."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidImageError
from app.service import _b64decode, _b64decode_strict


def stdlib(text: str) -> bytes | str:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return "refused"


def ours(text: str) -> bytes | str:
    try:
        return _b64decode_strict(text)
    except (binascii.Error, ValueError):
        return "refused"


# Valid base64 with a little damage: the paddings and stray characters where decoders differ.
damaged = st.builds(
    lambda data, tail, cut: base64.b64encode(data).decode()[: cut or None] + tail,
    st.binary(max_size=40),
    st.text(alphabet="A0+/=\n -_\x00é", max_size=4),
    st.integers(min_value=-3, max_value=0),
)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(damaged, st.text(alphabet="ABab09+/= \n", max_size=24)))
def test_decoding_accepts_and_gives_what_the_standard_library_does(text: str) -> None:
    assert ours(text) == stdlib(text)


@pytest.mark.parametrize("text", ["QUJD=", "QUI==", "QQ==QQ==", "QUJD\n", "=QUJD", "QUJ"])
def test_paddings_pybase64_refuses_are_decided_by_the_standard_library(text: str) -> None:
    assert ours(text) == stdlib(text)


def test_a_large_upload_decodes_slice_by_slice_to_the_same_bytes() -> None:
    data = bytes(range(256)) * 20_000  # 5 MB: more than one slice
    assert _b64decode(base64.b64encode(data).decode(), 0) == data
    with pytest.raises(InvalidImageError, match="not valid base64"):
        _b64decode(base64.b64encode(data).decode()[:-1] + "!", 3)
