"""OpenMP's wait policy per process shape (app/process/openmp_policy.py): PASSIVE in one
process, a short spin for an engine process of its own, and the user's own setting untouched."""

from __future__ import annotations

import pytest

from app.process.openmp_policy import ENGINE_SPINCOUNT, set_openmp_policy


def test_one_process_sleeps_between_forward_passes() -> None:
    environ: dict[str, str] = {}
    set_openmp_policy(engine_process=False, environ=environ)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_an_engine_process_spins_briefly() -> None:
    environ: dict[str, str] = {}
    set_openmp_policy(engine_process=True, environ=environ)
    assert environ == {"GOMP_SPINCOUNT": str(ENGINE_SPINCOUNT)}
    assert ENGINE_SPINCOUNT < 300_000  # libgomp's default spin, which it shortens


@pytest.mark.parametrize("engine_process", [True, False])
@pytest.mark.parametrize(
    "given",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "PASSIVE"}],
)
def test_a_policy_the_user_set_wins(engine_process: bool, given: dict[str, str]) -> None:
    environ = dict(given)
    set_openmp_policy(engine_process=engine_process, environ=environ)
    assert environ == given
