"""End to end, the guarantees of issue 13 (queue, disconnects, deadlines, drain) on a real
`detr-serve` with a slow null engine: the scenarios of scripts/checks/chaos.py, asserted.

Each starts a server of its own (a few seconds each); the bounds asserted are the design's
(queue depth 0, statuses, exit within shutdown_bound_s), never a measured speed."""

from __future__ import annotations

import pytest

from scripts.checks import chaos

pytestmark = pytest.mark.e2e


def _explain(row: chaos.Row) -> str:
    return f"{row.line()}\n--- server log (end) ---\n{row.log[-3000:]}"


def test_expired_burst_leaves_the_queue_while_the_long_batch_still_runs() -> None:
    row = chaos.expired_burst()
    assert row.figures["all within the first batch"] == "yes", _explain(row)
    # Dead work counts for nothing: the queue is empty and a new request is queued (then
    # answered 504 at its own deadline), not refused 429 by the expired burst.
    assert row.figures["queue depth after burst"] == 0, _explain(row)
    assert row.figures["new request"] == 504, _explain(row)
    assert row.statuses == {504: 10}, _explain(row)


@pytest.mark.parametrize("hang_up_s", [0.05, None], ids=["after-50ms", "once-queued"])
def test_clients_that_hang_up_cancel_their_queued_images(hang_up_s: float | None) -> None:
    """64 clients hang up 50 ms after sending, or once all their images are in the engine's
    queue (on a loaded machine 50 ms may pass before a front end has even read a body: the
    second case is the one that shows queued work cancelled)."""
    row = chaos.disconnects(clients=64, hang_up_s=hang_up_s)
    assert row.statuses == {200: 1}, _explain(row)  # the request sent after them
    if hang_up_s is None:
        assert row.figures["in the engine at hang-up"] == 64, _explain(row)
    # The first batch may hold up to 16 of them (an image in a running pass finishes); its 3 s
    # give the cancellations the time they need to reach the engine before the next.
    assert row.figures["images computed"] < 64, _explain(row)


def test_the_deadline_covers_waiting_for_a_download_slot_and_downloading() -> None:
    row = chaos.slow_url_storm(slots=4, uploads=20)
    assert row.statuses[200] == 20, _explain(row)  # uploads go on while every slot is held
    # Every slow request (4 downloading, 4 waiting for a slot) is answered 504 deadline_exceeded
    # at its 2 s deadline, while the origin still holds all of them open (it never sends).
    assert row.statuses[504] == 8, _explain(row)
    assert row.figures["slow URLs 504 (origin still sending)"] == 8, _explain(row)
    assert row.passed, _explain(row)  # the bodies' error type included


def test_sigterm_says_draining_at_once_and_finishes_accepted_work() -> None:
    row = chaos.sigterm(accepted=16)
    assert row.figures["/readyz after signal"] == "503 draining", _explain(row)
    assert row.figures["accepted answered 200"] == 16, _explain(row)
    assert row.figures["new request"] == 503, _explain(row)
    assert row.figures["exit code"] == 0, _explain(row)


def test_a_drain_that_times_out_answers_every_open_request_and_exits_within_its_bound() -> None:
    row = chaos.stuck_drain(drain_s=1.0)
    assert row.statuses == {503: 2}, _explain(row)
    assert row.figures["exit code"] == 0, _explain(row)
    assert float(row.figures["exit s"]) < float(row.figures["bound s"]), _explain(row)
    assert row.passed, _explain(row)  # JSON error bodies
