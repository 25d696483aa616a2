"""scripts/bench/bench.py run as a file, the way the README runs it: the runs it dispatches to
(bench_compare.py, bench_cuda.py) import no second copy of it, and so see the OMP_WAIT_POLICY
the user set, not the PASSIVE default bench.py sets for the peers afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import runpy, sys
sys.argv = ["scripts/bench/bench.py", "--help"]
try:
    runpy.run_path("scripts/bench/bench.py", run_name="__main__")
except SystemExit:
    pass
import scripts.bench.bench_compare as compare
import scripts.bench.bench_cuda  # noqa: F401
print("removed", compare._detr_env_remove())
print("copies", "scripts.bench.bench" in sys.modules)
"""


@pytest.mark.parametrize(
    ("user_policy", "removed"), [(None, "('OMP_WAIT_POLICY',)"), ("ACTIVE", "()")]
)
def test_compare_sees_the_users_omp_policy_through_bench_py(user_policy, removed):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_policy is not None:
        env["OMP_WAIT_POLICY"] = user_policy
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    # bench.py runs as __main__: a module importing `scripts.bench.bench` would run it again.
    assert lines["copies"] == "False"
    # detr-serve runs as shipped (PASSIVE removed) unless the user chose a policy for everyone.
    assert lines["removed"] == removed
