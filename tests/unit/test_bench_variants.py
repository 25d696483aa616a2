"""bench.py --e2e-vs-raw --variant: a row's environment and flags, read from one word."""

from __future__ import annotations

import pytest

from scripts.bench.bench_compare import Variant, parse_variant


def test_leading_upper_case_assignments_are_environment_and_the_rest_flags() -> None:
    got = parse_variant("spin=GOMP_SPINCOUNT=10000 OMP_WAIT_POLICY=PASSIVE --torch-threads 1")
    assert got == Variant(
        "spin",
        ("--torch-threads", "1"),
        (("GOMP_SPINCOUNT", "10000"), ("OMP_WAIT_POLICY", "PASSIVE")),
    )


def test_flags_alone_and_a_flag_value_with_an_equals_sign_stay_flags() -> None:
    assert parse_variant("delay=--max-batch-delay-ms 2") == Variant(
        "delay", ("--max-batch-delay-ms", "2")
    )
    assert parse_variant("x=--model=models/a B=1") == Variant("x", ("--model=models/a", "B=1"))


@pytest.mark.parametrize("text", ["no-equals-sign", "=--torch-threads 1"])
def test_a_variant_without_a_name_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--variant takes NAME="):
        parse_variant(text)
