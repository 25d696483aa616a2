"""scripts/gpu_check.sh --dry-run on the CPU: every step's command runs (the benchmarks at tiny
sizes, the GPU tests collected), each step is recorded with its status, and the summary fits a
screen. It measures nothing; it catches a broken command line or import before a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["r18", "kernel", "cuda_tests", "r50", "compile"]


def test_the_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "GPU_CHECK_BUDGET_S": "600"}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "check.json").read_text())["steps"]
    assert [s["name"] for s in steps] == STEPS
    for s in steps:
        assert s["status"] == "dry-run" and s["rc"] == 0, s
        assert s["reason"].startswith("needs CUDA"), s
    # The tests' files were collected, not run: imports and parametrisation hold.
    collected = (tmp_path / "cuda_tests.log").read_text()
    assert "tests/cuda/test_gpu_fast_path.py::test_thirty_mixed_batches" in collected
    assert "error" not in collected.lower().split("collected")[-1]
    assert "test_msda_op.py::" in (tmp_path / "kernel.log").read_text()
    # The R18 step went through the raw benchmark and both HTTP servers.
    r18 = json.loads((tmp_path / "r18.json").read_text())
    assert r18["dry_run"] is True and r18["dtype"] == "float32"
    (entry,) = r18["models"].values()
    assert [row["batch"] for row in entry["raw"]["rows"]] == [1, 2]
    assert entry["http"]["rows"] and entry["naive"]["rows"]
    assert all(row["failures"] == 0 for row in entry["http"]["rows"])
    assert "--torch-compile skipped" in (tmp_path / "compile.log").read_text()
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert len(summary) <= 40
    assert any(line.startswith("step r18 ") for line in summary)
    assert any("EAGER: CUDA graphs need a CUDA device" in line for line in summary)
