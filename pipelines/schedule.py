"""Scheduled and new-data retraining: a long-lived loop that submits the pipeline as Ray jobs.

Triggers are cron slots (croniter does the cron arithmetic, in the given time zone)
and changes of the data sources' fingerprint. Every trigger is a row of a small
SQLite history in the experiment's workdir. A slot is claimed in that table
(`INSERT OR IGNORE` on experiment, kind, slot) *before* its job is submitted, so a
restarted scheduler, or a second one on the same workdir, never fires a slot twice
(APScheduler's job store, tried first, fired a slot twice when two schedulers shared it). The newest slot missed while
the scheduler was down is run once or skipped, as `missed` says. A trigger while a
job of the experiment is still pending or running is skipped and recorded.
"""
from __future__ import annotations

import fcntl
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipelines import jobs

MISSED_POLICIES = ("run_once", "skip")
_ACTIVE = ("PENDING", "RUNNING")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS triggers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment TEXT NOT NULL,
    kind TEXT NOT NULL,            -- cron | new_data
    slot TEXT NOT NULL,            -- cron: the slot (UTC, ISO); new_data: the sources' fingerprint
    fired_at TEXT NOT NULL,        -- when the scheduler handled it (UTC, ISO)
    outcome TEXT NOT NULL,         -- submitted | skipped | failed
    job_id TEXT,
    job_status TEXT,               -- the job's last known status (PENDING ... SUCCEEDED, FAILED, STOPPED)
    detail TEXT,
    UNIQUE (experiment, kind, slot)
);
CREATE TABLE IF NOT EXISTS state (experiment TEXT, key TEXT, value TEXT, PRIMARY KEY (experiment, key));
"""


class ScheduleError(ValueError):
    """A bad cron string, time zone or policy; the message names the option."""


@dataclass(frozen=True)
class Trigger:
    experiment: str
    kind: str
    slot: str
    fired_at: str
    outcome: str
    job_id: str | None
    job_status: str | None
    detail: str


def check_cron(expression: str, tz_name: str):
    """The croniter iterator's inputs checked: (expression, ZoneInfo). Seconds, if any, are a 6th field, last.

    Raises:
        ScheduleError: the expression or the time zone is not valid.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from croniter import croniter

    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"--timezone {tz_name!r}: unknown time zone; use an IANA name such as "
                            f"Europe/Berlin or UTC") from None
    if not croniter.is_valid(expression):
        raise ScheduleError(f"--cron {expression!r}: not a valid cron expression; five fields "
                            f"'minute hour day-of-month month day-of-week' (for example '0 3 * * *'), "
                            f"or six with seconds last")
    return expression, tz


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

    def claim(self, experiment: str, kind: str, slot: str) -> bool:
        """Record the trigger as being handled; False when it already was (by this or another scheduler)."""
        with self._db() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO triggers (experiment, kind, slot, fired_at, outcome, detail) "
                "VALUES (?, ?, ?, ?, 'claimed', '')", (experiment, kind, slot, _utc_now()))
            return cursor.rowcount == 1

    def settle(self, experiment: str, kind: str, slot: str, outcome: str, job_id: str | None = None,
               job_status: str | None = None, detail: str = "") -> None:
        with self._db() as db:
            db.execute("UPDATE triggers SET outcome = ?, job_id = ?, job_status = ?, detail = ? "
                       "WHERE experiment = ? AND kind = ? AND slot = ?",
                       (outcome, job_id, job_status, detail, experiment, kind, slot))

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

    def triggers(self, experiment: str | None = None) -> list[Trigger]:
        query = "SELECT experiment, kind, slot, fired_at, outcome, job_id, job_status, detail FROM triggers"
        with self._db() as db:
            rows = db.execute(query + (" WHERE experiment = ?" if experiment else "") + " ORDER BY id",
                              (experiment,) if experiment else ()).fetchall()
        return [Trigger(*row) for row in rows]

    def unsettled_jobs(self) -> list[str]:
        with self._db() as db:
            rows = db.execute("SELECT job_id FROM triggers WHERE job_id IS NOT NULL AND "
                              "(job_status IS NULL OR job_status IN ('PENDING', 'RUNNING'))").fetchall()
        return [r[0] for r in rows]


@dataclass(frozen=True)
class JobTemplate:
    """What each trigger submits: the experiment as `gptforge submit` would send it."""

    experiment_name: str
    experiment: str  # relative to the project
    overrides: tuple
    env: dict
    address: str


class Scheduler:
    """Fires cron slots and new-data triggers as Ray jobs; `run_forever` until interrupted.

    Args:
        cron: a cron expression (or None), read in `tz_name`.
        fingerprint: returns the data sources' fingerprint; with `poll_s`, a change triggers a run.
        missed: `run_once` (the newest slot missed while down runs once) or `skip` (recorded only).
    """

    def __init__(self, template: JobTemplate, history: History, lock_path: str | Path, *, cron: str | None = None,
                 tz_name: str = "UTC", fingerprint: Callable[[], str] | None = None, poll_s: float = 60.0,
                 missed: str = "run_once", say: Callable[[str], None] = print):
        if missed not in MISSED_POLICIES:
            raise ScheduleError(f"--missed {missed!r}: one of {', '.join(MISSED_POLICIES)}")
        if poll_s <= 0:
            raise ScheduleError(f"--poll {poll_s}: must be a positive number of seconds")
        self.cron = check_cron(cron, tz_name) if cron else None
        self.template, self.history, self.lock_path = template, history, Path(lock_path)
        self.fingerprint, self.poll_s, self.missed, self.say = fingerprint, poll_s, missed, say
        self.name = template.experiment_name
        self._next_slot: datetime | None = None
        self._next_poll = 0.0

    # ------------------------------------------------------------ the loop

    def start(self, now: datetime | None = None) -> None:
        """Catch up with what happened while no scheduler ran: a missed slot, changed data."""
        now = now or datetime.now(timezone.utc)
        if self.cron:
            last = self.history.last_slot(self.name, "cron")
            missed = self._slots_between(datetime.fromisoformat(last), now) if last else []
            if missed:
                slot = missed[-1]
                if self.missed == "run_once":
                    self.say(f"{len(missed)} slot(s) missed while down; running the newest, {slot.isoformat()}")
                    self._fire("cron", slot.isoformat(), detail=f"missed while down ({len(missed)} slot(s))")
                elif self.history.claim(self.name, "cron", slot.isoformat()):
                    self.history.settle(self.name, "cron", slot.isoformat(), "skipped",
                                        detail=f"missed while down ({len(missed)} slot(s)); --missed skip")
                    self.say(f"{len(missed)} slot(s) missed while down; skipped (--missed skip)")
            self._next_slot = self._slot_after(now)
            self.say(f"next run at {self._next_slot.astimezone(self.cron[1]).isoformat()}")
        if self.fingerprint is not None:
            if self.history.get(self.name, "data_fingerprint") is None:
                self.history.put(self.name, "data_fingerprint", self.fingerprint())  # the baseline
                self.say("recorded the data sources' fingerprint; a change will trigger a run")
            self._next_poll = 0.0  # a change while down is found at the first tick

    def tick(self, now: datetime | None = None) -> None:
        """Fire whatever is due at `now`, and refresh the status of the jobs already fired."""
        now = now or datetime.now(timezone.utc)
        self._refresh_statuses()
        if self.cron and self._next_slot is not None and now >= self._next_slot:
            due = self._next_slot
            self._next_slot = self._slot_after(now)
            late = self._slots_between(due, now)  # slots that passed while the last trigger was handled
            self._fire("cron", (late[-1] if late else due).isoformat())
        if self.fingerprint is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            current = self.fingerprint()
            if current != self.history.get(self.name, "data_fingerprint"):
                self.history.put(self.name, "data_fingerprint", current)
                self.say(f"the data sources changed (fingerprint {current[:12]})")
                self._fire("new_data", current)

    def run_forever(self) -> None:
        self.start()
        while True:
            self.tick()
            time.sleep(self._sleep_s())

    def _sleep_s(self) -> float:
        waits = [5.0]  # job statuses are refreshed at least this often
        if self._next_slot is not None:
            waits.append((self._next_slot - datetime.now(timezone.utc)).total_seconds())
        if self.fingerprint is not None:
            waits.append(self._next_poll - time.monotonic())
        return min(max(0.05, w) for w in waits)

    # ------------------------------------------------------------ triggers

    def _fire(self, kind: str, slot: str, detail: str = "") -> None:
        # The lock makes "is a job running? then submit" one step across schedulers of this workdir.
        with _file_lock(self.lock_path):
            if not self.history.claim(self.name, kind, slot):
                return  # handled before (a restart, or another scheduler)
            try:
                running = [j for j in jobs.list_jobs(self.template.address, self.name) if j.status in _ACTIVE]
            except jobs.JobError as error:  # the job server is down: record it, keep scheduling
                self.history.settle(self.name, kind, slot, "failed", detail=str(error))
                self.say(f"{kind} trigger {slot[:25]}: could not reach the job server: {error}")
                return
            if running:
                why = f"job {running[0].job_id} of {self.name!r} is still {running[0].status.lower()}"
                self.history.settle(self.name, kind, slot, "skipped", detail="; ".join(filter(None, [detail, why])))
                self.say(f"{kind} trigger {slot[:25]} skipped: {why}")
                return
            stamp = _compact(slot) if kind == "cron" else f"{_compact(_utc_now())}-{slot[:8]}"
            run_name = f"{self.name}-{kind.replace('_', '-')}-{stamp}"
            try:
                job_id = jobs.submit(self.template.address, self.template.experiment, list(self.template.overrides),
                                     experiment_name=self.name, env=self.template.env, run_name=run_name,
                                     submission_id=f"gptforge-{run_name}")
            except jobs.JobError as error:
                self.history.settle(self.name, kind, slot, "failed", detail=str(error))
                self.say(f"{kind} trigger {slot[:25]}: could not submit: {error}")
                return
            self.history.settle(self.name, kind, slot, "submitted", job_id, "PENDING", detail or run_name)
            self.say(f"{kind} trigger {slot[:25]}: submitted job {job_id} (run {run_name})")

    def _refresh_statuses(self) -> None:
        for job_id in self.history.unsettled_jobs():
            try:
                self.history.set_job_status(job_id, jobs.status(job_id, self.template.address))
            except jobs.JobError as error:
                self.say(f"could not read the status of job {job_id}: {error}")

    # --------------------------------------------------------------- slots

    def _slot_after(self, moment: datetime) -> datetime:
        from croniter import croniter

        expression, tz = self.cron
        return croniter(expression, moment.astimezone(tz)).get_next(datetime).astimezone(timezone.utc)

    def _slots_between(self, after: datetime, until: datetime) -> list[datetime]:
        """Slots in (after, until]."""
        slots, slot = [], self._slot_after(after)
        while slot <= until and len(slots) < 10_000:
            slots.append(slot)
            slot = self._slot_after(slot)
        return slots


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _compact(iso: str) -> str:
    """2026-12-01T03:00:00+00:00 -> 20261201T030000: for run names and job ids."""
    return "".join(c for c in iso[:19] if c.isalnum())
