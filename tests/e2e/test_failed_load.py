"""End to end, a model that cannot be loaded: the real `detr-serve` exits with status 1 and a
log line naming the model folder and the cause (the default), or, with
--no-exit-on-load-failure, stays up and says why on /readyz, /healthz and every inference
route (503), in the process split and in one process."""

from __future__ import annotations

import signal

import pytest

from scripts.checks.failed_load import CAUSES, failed_load_row

pytestmark = pytest.mark.e2e


def _failure_line(log: str, model_text: str, cause: str) -> str | None:
    """The log line that names both the model folder and the cause."""
    return next((ln for ln in log.splitlines() if model_text in ln and cause in ln), None)


@pytest.mark.parametrize("case", ["corrupt-weights", "unknown-architecture", "missing-folder"])
def test_a_model_that_cannot_load_stops_the_server_with_status_1(case: str) -> None:
    row = failed_load_row(case, stay_up=False)
    assert "timed_out" not in row, row["log"][-3000:]
    # The settings refuse a missing folder before anything starts (status 2, like any
    # invalid setting); the others fail in the engine and stop everything (status 1).
    assert row["exit_status"] == (2 if case == "missing-folder" else 1), row["log"][-3000:]
    assert row["log_names_model"] and row["log_names_cause"], row["log"][-3000:]
    assert _failure_line(row["log"], "broken-" + case, CAUSES[case]), row["log"][-3000:]
    # Not restarted in a loop: the engine was started once.
    assert row["log"].count("engine 0 started") <= 1


def test_one_process_mode_exits_with_status_1_too() -> None:
    row = failed_load_row("corrupt-weights", stay_up=False, extra_args=("--no-engine-process",))
    assert "timed_out" not in row, row["log"][-3000:]
    assert row["exit_status"] == 1, row["log"][-3000:]
    assert _failure_line(row["log"], "broken-corrupt-weights", "SafetensorError")


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("corrupt-weights", ()),
        ("missing-folder", ()),
        ("unknown-architecture", ("--no-engine-process",)),
    ],
)
def test_staying_up_every_route_says_why(case: str, extra: tuple[str, ...]) -> None:
    row = failed_load_row(case, stay_up=True, extra_args=extra)
    assert row.get("running") and row.get("readyz") == 503, row["log"][-3000:]
    reason = row["readyz_body"]["reason"]
    assert row["readyz_body"]["status"] == "failed"
    assert "broken-" + case in reason and CAUSES[case] in reason
    assert row["healthz"] == 200 and row["healthz_body"] == {"status": "failed", "reason": reason}
    assert row["detect"] == 503
    assert row["detect_body"]["error"] == {"type": "model_load_failed", "message": reason}
    assert row["v2_infer"] == 503 and row["v2_infer_body"] == {"error": reason}
    assert row["models"] == 503 and row["v2_ready"] == 503
    # Stopped by SIGTERM, as asked: the supervisor exits 0; one process is uvicorn alone, which
    # raises the signal it caught again once shut down.
    assert row["exit_status"] == (-signal.SIGTERM if extra else 0)
    assert row["log"].count("engine 0 started") <= 1
