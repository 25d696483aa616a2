"""The job store (issue 15): one claim per job across processes, progress, cancellation,
interrupted jobs failed with a reason, retention and the size limit."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from app.jobs.store import INTERRUPTED, JobStore, new_job_id


def _claim(folder: str) -> str | None:
    job = JobStore(Path(folder)).claim()
    return job.id if job is not None else None


def test_each_queued_job_is_claimed_once_across_processes(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = {store.create(new_job_id(), {}, "upload", 0, 100).id for _ in range(12)}  # type: ignore[union-attr]
    with ProcessPoolExecutor(4) as pool:
        claimed = list(pool.map(_claim, [str(tmp_path)] * 16))
    got = [c for c in claimed if c is not None]
    assert sorted(got) == sorted(ids)  # every job once, none twice
    assert all(j.status == "running" for j in store.recent(100))


def test_the_queue_limit_refuses_past_max_queued(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    assert store.create(new_job_id(), {}, "upload", 0, 1) is not None
    assert store.create(new_job_id(), {}, "upload", 0, 1) is None


def test_cancel_progress_and_interrupted_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    a = store.create(new_job_id(), {}, "upload", 0, 10)
    b = store.create(new_job_id(), {}, "upload", 0, 10)
    assert a is not None and b is not None
    assert store.claim().id == a.id  # type: ignore[union-attr]
    assert store.progress(a.id, 5) == "running"
    cancelled = store.cancel(b.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    # A new runner finds `a` still running: its previous holder is gone.
    assert store.fail_interrupted() == [a.id]
    failed = store.get(a.id)
    assert failed is not None and failed.status == "failed" and failed.error == INTERRUPTED
    assert failed.tiles_done == 5
    assert store.progress(a.id, 6) == "failed"  # a late write does not revive it


def test_retention_and_size_limit_delete_finished_jobs_oldest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = []
    for _ in range(3):
        job = store.create(new_job_id(), {}, "upload", 0, 10)
        assert job is not None
        store.claim()
        store.set_geometry(job.id, 10, 10, 1)
        store.succeed(job.id, {"width": 10, "height": 10, "detections": [{"x": "y" * 50_000}]})
        ids.append(job.id)
        time.sleep(0.01)
    queued = store.create(new_job_id(), {}, "upload", 0, 10)
    assert queued is not None
    assert store.prune(retention_s=3600, max_bytes=1 << 30) == 0
    limit = store.size_bytes() - 40_000  # one result less fits
    assert store.prune(retention_s=3600, max_bytes=limit) >= 1
    assert store.get(ids[0]) is None and store.get(ids[2]) is not None
    assert store.get(queued.id) is not None  # never a job that has not ended
    left = sum(store.get(i) is not None for i in ids)
    assert store.prune(retention_s=0.0, max_bytes=1 << 30) == left
    assert store.get(queued.id) is not None and store.get(ids[2]) is None
