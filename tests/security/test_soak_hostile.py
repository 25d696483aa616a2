"""The mixed soak (scripts/bench/loadtest.py --hostile) briefly, against the real server: ordinary
overload alone, then the same overload with every hostile class of issue 20 beside it. The
script's own rules decide its exit status; here we also check that its report shows each
hostile class sent and refused, and ordinary requests answered in both phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench.loadtest import hostile_problems, normal_problems

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "compressed-url": {400},
    "pixel-flood": {413},
    "gzip-v2-bomb": {413},
    "scan-bomb": {400},
    "dense-json": {413},
    "malformed-v2": {400},
    "oversized-header": {431},
}


def test_mixed_soak_refuses_every_hostile_class_and_keeps_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench" / "loadtest.py"),
        "--model", str(tiny_model_dir), "--minutes", "0.15", "--calibrate-s", "3",
        "--users", "16", "--hostile", "--out", str(out),
    ]  # fmt: skip
    # One torch thread: the soak's own Locust process needs the other core.
    env = {**os.environ, "DETR_SERVE_TORCH_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, cwd=ROOT)
    summary = done.stdout[done.stdout.find("ordinary requests") :]
    assert done.returncode == 0, summary + done.stderr[-3000:]
    assert summary.rstrip().endswith("PASS"), summary
    report = json.loads(out.read_text())
    assert report["problems"] == []
    for phase in ("normal_only", "mixed"):
        assert (
            report[phase]["answered"] > 0 and report[phase]["answered"] == report[phase]["accepted"]
        ), report[phase]
    hostile = report["mixed"]["hostile"]
    assert set(hostile) == set(CLASSES)
    for name, refusals in CLASSES.items():
        row = hostile[name]
        assert row["sent"] >= 1, (name, row)
        assert row["refused_4xx"] == row["sent"], (name, row)
        assert {int(s) for s in row["statuses"]} <= refusals | {429}, (name, row)
        assert int(min(refusals)) in {int(s) for s in row["statuses"]}, (name, row)
    assert report["p99_factor"] <= 3.0
    rss = report["rss_mb"]
    assert 0 < rss["start"] <= rss["peak"] and rss["end"] <= rss["peak"], rss


def _row(**counts: int) -> dict:
    row = {
        "sent": 4,
        "expected": [413],
        "accepted_2xx": 0,
        "server_errors": 0,
        "unanswered": 0,
        "unexpected": 0,
        "unnamed": 0,
        "rejected_without_retry_after": 0,
    }
    return {**row, **counts}


@pytest.mark.parametrize(
    ("counts", "named"),
    [
        ({"accepted_2xx": 1}, "answered 2xx"),
        ({"server_errors": 2}, "answered 5xx"),
        ({"unanswered": 1}, "got no response"),
        ({"unexpected": 1}, "other than [413]"),
        ({"unnamed": 1}, "without naming"),
        ({"rejected_without_retry_after": 1}, "without Retry-After"),
        ({"sent": 0}, "never sent"),
    ],
)
def test_the_soak_rules_fail_a_hostile_class_that_is_not_refused(counts, named) -> None:
    assert hostile_problems({"pixel-flood": _row()}) == []
    problems = hostile_problems({"pixel-flood": _row(**counts)})
    assert len(problems) == 1 and problems[0].startswith("pixel-flood:"), problems
    assert named in problems[0], problems


def test_the_soak_rules_fail_ordinary_requests_lost_or_5xx() -> None:
    ok = {
        "accepted": 10,
        "answered": 10,
        "server_errors": 0,
        "rejected_without_retry_after": 0,
        "lost": 0,
    }
    assert normal_problems(ok, "alone") == []
    assert "accepted 10 != answered 9" in normal_problems({**ok, "answered": 9}, "x")[0]
    assert "5xx" in normal_problems({**ok, "server_errors": 1}, "x")[0]
    assert "Retry-After" in normal_problems({**ok, "rejected_without_retry_after": 1}, "x")[0]
    assert "no response" in normal_problems({**ok, "lost": 1}, "x")[0]
