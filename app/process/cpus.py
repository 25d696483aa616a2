"""How many CPUs this process may really use: affinity, and the container's CPU quota.

os.cpu_count() reports the host's cores; inside a container limited to 2 CPUs on a 64-core
host it would start 64 workers that the quota then throttles.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = _CGROUP) -> int:
    """min(affinity, cgroup quota), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, else v1 cfs quota/period); None: no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def default_workers(cpus: int, on_cuda: bool) -> int:
    """Front-end workers when --workers is not given. On the CPU the model needs the cores
    while it runs: half of them decode and answer HTTP. On a GPU the engine process needs
    about one core to launch kernels; the rest serve HTTP and decode (capped: past 16 the
    engine's single socket reader, not the front ends, is the limit)."""
    if on_cuda:
        return max(1, min(cpus - 1, 16))
    return max(1, cpus // 2)
