"""glibc settings reach the processes the server spawns, and glibc's own variables win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.process.malloc_tuning import cap_arenas


def test_the_arena_cap_is_passed_to_spawned_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    cap_arenas(2)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "2"


def test_an_operators_arena_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    cap_arenas(2)
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
