"""CPUs usable by the process (affinity, cgroup v2 and v1 quotas) and the default --workers."""

from __future__ import annotations

import os
from pathlib import Path

from app.process.cpus import available_cpus, cgroup_cpu_limit, default_workers


def test_cgroup_v2_quota_is_read(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5


def test_cgroup_v2_without_limit_says_none(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_is_read(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_available_cpus_is_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert available_cpus(tmp_path) == affinity  # a quota above the affinity changes nothing
    assert available_cpus(tmp_path / "missing") == affinity


def test_default_workers_leave_the_cpu_engine_half_and_the_gpu_engine_one_core() -> None:
    assert [default_workers(n, on_cuda=False) for n in (1, 2, 4, 16)] == [1, 1, 2, 8]
    assert [default_workers(n, on_cuda=True) for n in (1, 2, 8, 64)] == [1, 1, 7, 16]
