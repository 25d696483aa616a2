"""The job store: one SQLite database in WAL mode beside a folder of uploaded images.

Why SQLite from the standard library: every front-end worker and the job runner are separate
processes on one machine; SQLite gives them one transactional table with no server to run, WAL
lets readers (polls) go on while the runner writes progress, and `BEGIN IMMEDIATE` makes the
claim of a queued job atomic across processes. An ORM or an async driver would add a dependency
for a dozen short statements (each well under a millisecond; the routes run them on a thread).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
INTERRUPTED = (
    "interrupted: the server stopped while this job ran (restart or crash); submit it again"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    tiles_done INTEGER NOT NULL DEFAULT 0,
    tiles_total INTEGER,
    width INTEGER,
    height INTEGER,
    error TEXT,
    request TEXT NOT NULL,
    source TEXT NOT NULL,
    model TEXT,
    detections INTEGER,
    result TEXT,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
"""


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    created: float
    started: float | None
    finished: float | None
    tiles_done: int
    tiles_total: int | None
    width: int | None
    height: int | None
    error: str | None
    request: dict[str, Any]
    source: str  # "upload" or the URL
    model: str | None
    detections: int | None
    bytes: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["request"] = json.loads(values["request"])
        values.pop("result", None)
        return cls(**values)


_COLUMNS = (
    "id, status, created, started, finished, tiles_done, tiles_total, width, height, error, "
    "request, source, model, detections, bytes"
)


def new_job_id() -> str:
    """128 random bits, URL-safe: a job id cannot be guessed."""
    return secrets.token_urlsafe(16)


class JobStore:
    """Opened by each process that uses it; a connection per call (they are cheap in SQLite,
    and a connection must not cross threads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uploads = folder / "uploads"
        self.path = folder / "jobs.sqlite3"
        self.uploads.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        try:
            yield db
        finally:
            db.close()

    def upload_path(self, job_id: str) -> Path:
        return self.uploads / job_id

    # -- the front ends -------------------------------------------------------------------------
    def create(
        self, job_id: str, request: dict[str, Any], source: str, size: int, max_queued: int
    ) -> Job | None:
        """Queue a job; None when `max_queued` jobs already wait (the caller answers 429)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            (queued,) = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()
            if queued >= max_queued:
                db.execute("ROLLBACK")
                return None
            db.execute(
                "INSERT INTO jobs (id, status, created, request, source, model, bytes) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, time.time(), json.dumps(request), source, request.get("model"), size),
            )
            db.execute("COMMIT")
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row is not None else None

    def result(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["result"] is None:
            return None
        value: dict[str, Any] = json.loads(row["result"])
        return value

    def recent(self, limit: int, status: str | None = None) -> list[Job]:
        query = f"SELECT {_COLUMNS} FROM jobs"
        args: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (the runner sees it between two chunks of tiles); a
        finished job stays as it is. None: no such job."""
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finished = ?, error = 'cancelled by a "
                "DELETE request' WHERE id = ? AND status IN ('queued', 'running')",
                (time.time(), job_id),
            )
        job = self.get(job_id)
        if job is not None and job.status == "cancelled":
            self._remove_upload(job_id)
        return job

    # -- the runner -----------------------------------------------------------------------------
    def claim(self) -> Job | None:
        """The oldest queued job, now running (atomic: two runners never take the same one)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1"
            ).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started = ? WHERE id = ?",
                (time.time(), row["id"]),
            )
            db.execute("COMMIT")
        return self.get(row["id"])

    def set_geometry(self, job_id: str, width: int, height: int, tiles: int) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET width = ?, height = ?, tiles_total = ? WHERE id = ?",
                (width, height, tiles, job_id),
            )

    def progress(self, job_id: str, tiles_done: int) -> str | None:
        """Record progress; the job's status now (the runner stops when it is not running)."""
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET tiles_done = ? WHERE id = ? AND status = 'running'",
                (tiles_done, job_id),
            )
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else str(row["status"])

    def succeed(self, job_id: str, result: dict[str, Any]) -> bool:
        text = json.dumps(result, separators=(",", ":"))
        with self._connect() as db:
            updated = db.execute(
                "UPDATE jobs SET status = 'succeeded', finished = ?, result = ?, detections = ?, "
                "tiles_done = tiles_total, bytes = bytes + ? WHERE id = ? AND status = 'running'",
                (time.time(), text, len(result["detections"]), len(text), job_id),
            ).rowcount
        self._remove_upload(job_id)
        return bool(updated)

    def fail(self, job_id: str, reason: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ? "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (time.time(), reason, job_id),
            )
        self._remove_upload(job_id)

    def fail_interrupted(self) -> list[str]:
        """Jobs left 'running' by a runner that is gone (restart, crash): failed with a reason.
        Only the runner holding the folder's lock calls this, at its start."""
        with self._connect() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
            db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ? "
                "WHERE status = 'running'",
                (time.time(), INTERRUPTED),
            )
        for job_id in ids:
            self._remove_upload(job_id)
        return ids

    # -- retention and size ---------------------------------------------------------------------
    def size_bytes(self) -> int:
        """The database's pages in use (freed pages are reused, and returned to the disk by
        the VACUUM after a prune) and the uploads on disk."""
        with self._connect() as db:
            (pages,) = db.execute("PRAGMA page_count").fetchone()
            (free,) = db.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = db.execute("PRAGMA page_size").fetchone()
        total = (pages - free) * page_size
        for upload in self.uploads.iterdir():
            try:
                total += upload.stat().st_size
            except FileNotFoundError:
                pass
        return int(total)

    def prune(self, retention_s: float, max_bytes: int) -> int:
        """Delete jobs finished more than `retention_s` ago, then the oldest finished ones while
        the store is over `max_bytes`; the count deleted."""
        deleted = 0
        with self._connect() as db:
            deleted += db.execute(
                "DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "AND finished < ?",
                (time.time() - retention_s,),
            ).rowcount
        while self.size_bytes() > max_bytes:
            with self._connect() as db:
                row = db.execute(
                    "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                    "ORDER BY finished LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                db.execute("DELETE FROM jobs WHERE id = ?", (row["id"],))
            self._remove_upload(row["id"])
            deleted += 1
        if deleted:
            with self._connect() as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.execute("VACUUM")
        return deleted

    def _remove_upload(self, job_id: str) -> None:
        path = self.upload_path(job_id)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
