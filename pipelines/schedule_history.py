"""The scheduler's SQLite record of every trigger, and the claim that makes each trigger fire once.

A trigger is claimed (`INSERT OR IGNORE` on experiment, kind, slot) *before* its job is
submitted, so a restarted scheduler, or a second one on the same workdir, never fires a
slot twice; a row left `claimed` is one whose scheduler stopped between the claim and
the answer, and is finished by the next one to start (`claim(..., retry=("claimed",))`).
Every detail stored passes through `redact`: a job server's address may carry a token.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipelines.tracking import redact

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triggers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment TEXT NOT NULL,
    kind TEXT NOT NULL,            -- cron | new_data
    slot TEXT NOT NULL,            -- cron: the slot (UTC, ISO); new_data: FINGERPRINT@N, the sources' Nth change
    fired_at TEXT NOT NULL,        -- when the scheduler last handled it (UTC, ISO)
    outcome TEXT NOT NULL,         -- claimed (being handled) | submitted | skipped | failed
    job_id TEXT,
    job_status TEXT,               -- the job's last known status (PENDING ... SUCCEEDED, FAILED, STOPPED)
    detail TEXT,
    UNIQUE (experiment, kind, slot)
);
CREATE TABLE IF NOT EXISTS state (experiment TEXT, key TEXT, value TEXT, PRIMARY KEY (experiment, key));
"""


@dataclass(frozen=True)
class Trigger:
    """One row of the history."""

    experiment: str
    kind: str
    slot: str
    fired_at: str
    outcome: str
    job_id: str | None
    job_status: str | None
    detail: str


class History:
    """The SQLite record of every trigger, and the claim that makes each slot fire once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    def claim(self, experiment: str, kind: str, slot: str, retry: tuple = ()) -> bool:
        """Record the trigger as being handled; False when it already was (by this or another scheduler).

        Args:
            retry: outcomes of an existing row that may be handled again (it becomes `claimed`).
        """
        with self._db() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO triggers (experiment, kind, slot, fired_at, outcome, detail) "
                "VALUES (?, ?, ?, ?, 'claimed', '')", (experiment, kind, slot, _utc_now()))
            if cursor.rowcount == 1 or not retry:
                return cursor.rowcount == 1
            cursor = db.execute(
                f"UPDATE triggers SET outcome = 'claimed', fired_at = ? WHERE experiment = ? AND kind = ? "
                f"AND slot = ? AND outcome IN ({', '.join('?' * len(retry))})",
                (_utc_now(), experiment, kind, slot, *retry))
            return cursor.rowcount == 1

    def settle(self, experiment: str, kind: str, slot: str, outcome: str, job_id: str | None = None,
               job_status: str | None = None, detail: str = "") -> None:
        with self._db() as db:
            db.execute("UPDATE triggers SET outcome = ?, job_id = ?, job_status = ?, detail = ? "
                       "WHERE experiment = ? AND kind = ? AND slot = ?",
                       (outcome, job_id, job_status, redact(detail), experiment, kind, slot))

    def set_job_status(self, job_id: str, status: str) -> None:
        with self._db() as db:
            db.execute("UPDATE triggers SET job_status = ? WHERE job_id = ?", (status, job_id))

    def last_slot(self, experiment: str, kind: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT max(slot) FROM triggers WHERE experiment = ? AND kind = ?",
                             (experiment, kind)).fetchone()
        return row[0]

    def get(self, experiment: str, key: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM state WHERE experiment = ? AND key = ?", (experiment, key)).fetchone()
        return row[0] if row else None

    def put(self, experiment: str, key: str, value: str) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (experiment, key, value))

    def triggers(self, experiment: str | None = None, outcome: str | None = None) -> list[Trigger]:
        """The rows, oldest first: all, or `experiment`'s, or those with `outcome`."""
        where = [(c, v) for c, v in (("experiment", experiment), ("outcome", outcome)) if v is not None]
        query = "SELECT experiment, kind, slot, fired_at, outcome, job_id, job_status, detail FROM triggers"
        if where:
            query += " WHERE " + " AND ".join(f"{column} = ?" for column, _ in where)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY id", tuple(v for _, v in where)).fetchall()
        return [Trigger(*row) for row in rows]

    def unsettled_jobs(self) -> list[str]:
        with self._db() as db:
            rows = db.execute("SELECT job_id FROM triggers WHERE job_id IS NOT NULL AND "
                              "(job_status IS NULL OR job_status IN ('PENDING', 'RUNNING'))").fetchall()
        return [r[0] for r in rows]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()
