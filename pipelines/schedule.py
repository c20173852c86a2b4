"""Scheduled and new-data retraining: a long-lived loop that submits the pipeline as Ray jobs.

Triggers are cron slots (croniter does the cron arithmetic on the wall clock of the given
time zone) and changes of the data sources' fingerprint. Every trigger is a row of a small
SQLite history in the experiment's workdir (`pipelines/schedule_history.py`), claimed
*before* its job is submitted, so a restarted scheduler, or a second one on the same
workdir, never fires a slot twice (APScheduler's job store, tried first, fired a slot twice
when two schedulers shared it). A job's submission id is made from its trigger, and the job
server keeps one job per id, so a trigger handled again (a row still `claimed` because its
scheduler stopped half-way, finished by the next one to start) never starts a second job.
The newest slot missed while the scheduler was down is run once or skipped, as `missed`
says. A trigger while a job of the experiment is still pending or running is skipped and
recorded.

Nothing that goes wrong with one trigger stops the scheduler: a job server answering an
error, refusing the credentials or not answering, or data sources briefly unreadable, is
recorded (the trigger's row is settled `failed`), said once, and the loop goes on. Every
message and stored detail passes through `redact`, as an address may carry a token.
"""
from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipelines import jobs
from pipelines.schedule_history import History, Trigger
from pipelines.tracking import error_line, redact

__all__ = ["MISSED_POLICIES", "History", "JobTemplate", "ScheduleError", "Scheduler", "Trigger", "check_cron"]

MISSED_POLICIES = ("run_once", "skip")
_ACTIVE = ("PENDING", "RUNNING")
_MAX_CRON_STEPS = 100_000  # wall-clock slots looked at for the next instant (an hour of seconds fits)


class ScheduleError(ValueError):
    """A bad cron string, time zone or policy; the message names the option."""


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

    A cron slot is a wall-clock time in `tz_name`, and each fires once, across clock changes
    too. In the hour the clock repeats (autumn: 02:00-03:00 twice in Europe/Berlin), a slot
    fires at its first occurrence only, so a job every few minutes pauses for the repeated
    hour. A slot in the hour the clock skips (spring: 02:00 jumps to 03:00) fires once, at
    the moment of the jump (02:30 runs at 03:00 summer time).

    New data fires when the sources' fingerprint differs from the one last submitted. That
    fingerprint is stored only once its job is submitted, so a change whose submit failed,
    or that came while a job was still running, is tried again at the next poll. Each change
    is its own trigger (`FINGERPRINT@N`, the Nth), so data returning to an earlier state fires.

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
        self.fingerprint, self.poll_s, self.missed = fingerprint, poll_s, missed
        self.say = lambda message: say(redact(message))
        self.name = template.experiment_name
        self._next_slot: datetime | None = None
        self._next_poll = 0.0
        self._said: dict = {}  # what was last said about each trigger, so a retry that fails alike is quiet

    # ------------------------------------------------------------ the loop

    def start(self, now: datetime | None = None) -> None:
        """Catch up with what happened while no scheduler ran: triggers left half-handled, a missed slot."""
        now = now or datetime.now(timezone.utc)
        self._guarded("finishing the triggers left claimed", self._finish_claimed)
        if self.cron:
            self._guarded("catching up with missed slots", lambda: self._catch_up(now))
            self._next_slot = self._slot_after(now)
            self.say(f"next run at {self._next_slot.astimezone(self.cron[1]).isoformat()}")
        self._next_poll = 0.0  # a change of the data while down is found at the first tick

    def tick(self, now: datetime | None = None) -> None:
        """Fire whatever is due at `now`, and refresh the status of the jobs already fired; never raises."""
        now = now or datetime.now(timezone.utc)
        self._guarded("refreshing job statuses", self._refresh_statuses)
        if self.cron and self._next_slot is not None and now >= self._next_slot:
            due = self._next_slot
            self._next_slot = self._slot_after(now)
            late = self._slots_between(due, now)  # slots that passed while the last trigger was handled
            slot = (late[-1] if late else due).isoformat()
            self._guarded(f"cron trigger {slot}", lambda: self._fire("cron", slot))
        if self.fingerprint is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            self._guarded("reading the data sources' fingerprint", self._check_data)

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

    def _guarded(self, what: str, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception as error:  # noqa: BLE001 - one trigger's trouble must not end the scheduler
            self._say_once(("error", what), f"{what}: {error_line(error)}; trying again later")

    def _say_once(self, about, message: str) -> None:
        if self._said.get(about) != message:
            self._said[about] = message
            self.say(message)

    # ------------------------------------------------------------ triggers

    def _finish_claimed(self) -> None:
        for row in self.history.triggers(self.name, outcome="claimed"):
            self.say(f"{row.kind} trigger {row.slot[:25]}: its scheduler stopped while handling it; handling it now")
            self._fire(row.kind, row.slot, retry=("claimed",))

    def _catch_up(self, now: datetime) -> None:
        last = self.history.last_slot(self.name, "cron")
        missed = self._slots_between(datetime.fromisoformat(last), now) if last else []
        if not missed:
            return
        slot, why = missed[-1].isoformat(), f"missed while down ({len(missed)} slot(s))"
        if self.missed == "run_once":
            self.say(f"{len(missed)} slot(s) missed while down; running the newest, {slot}")
            self._fire("cron", slot, detail=why)
        elif self.history.claim(self.name, "cron", slot):
            self.history.settle(self.name, "cron", slot, "skipped", detail=f"{why}; --missed skip")
            self.say(f"{len(missed)} slot(s) missed while down; skipped (--missed skip)")

    def _check_data(self) -> None:
        current = self.fingerprint()
        stored = self.history.get(self.name, "data_fingerprint")
        if stored is None:
            self.history.put(self.name, "data_fingerprint", current)  # the baseline
            self.say("recorded the data sources' fingerprint; a change will trigger a run")
        elif current != stored:
            slot = f"{current}@{int(self.history.get(self.name, 'data_changes') or 0) + 1}"
            self._say_once(("changed", slot), f"the data sources changed (fingerprint {current[:12]})")
            self._fire("new_data", slot, retry=("failed", "skipped"))

    def _fire(self, kind: str, slot: str, detail: str = "", retry: tuple = ()) -> None:
        # The lock makes "is a job running? then submit" one step across schedulers of this workdir.
        with _file_lock(self.lock_path):
            if not self.history.claim(self.name, kind, slot, retry):
                return  # handled before (a restart, or another scheduler)
            outcome, job_id, stored, message = self._submit(kind, slot, detail)
            self.history.settle(self.name, kind, slot, outcome, job_id, "PENDING" if job_id else None, stored)
            if outcome == "submitted" and kind == "new_data":
                self._trained_on(slot)
        self._say_once((kind, slot), message)

    def _submit(self, kind: str, slot: str, detail: str) -> tuple:
        """(outcome, job id, detail to store, what to say) for a claimed trigger."""
        head, run_name = f"{kind} trigger {slot[:25]}", self._run_name(kind, slot)
        submission_id = f"gptforge-{run_name}"
        try:
            listed = jobs.list_jobs(self.template.address, self.name)
        except Exception as error:  # noqa: BLE001 - down, an error status, refused credentials: all recorded
            why = f"could not reach the job server: {error_line(error)}"
            return "failed", None, _joined(detail, why), f"{head}: {why}"
        if any(j.job_id == submission_id for j in listed):  # submitted by a scheduler that stopped before the answer
            return "submitted", submission_id, detail or run_name, f"{head}: job {submission_id} was submitted before"
        running = [j for j in listed if j.status in _ACTIVE]
        if running:
            why = f"job {running[0].job_id} of {self.name!r} is still {running[0].status.lower()}"
            return "skipped", None, _joined(detail, why), f"{head} skipped: {why}"
        try:
            job_id = jobs.submit(self.template.address, self.template.experiment, list(self.template.overrides),
                                 experiment_name=self.name, env=self.template.env, run_name=run_name,
                                 submission_id=submission_id)
        except Exception as error:  # noqa: BLE001 - as above
            why = f"could not submit: {error_line(error)}"
            return "failed", None, _joined(detail, why), f"{head}: {why}"
        return "submitted", job_id, detail or run_name, f"{head}: submitted job {job_id} (run {run_name})"

    def _run_name(self, kind: str, slot: str) -> str:
        """The job's run name, from the trigger alone: the submission id is made from it."""
        if kind == "cron":
            return f"{self.name}-cron-{_compact(slot)}"
        fingerprint, _, change = slot.partition("@")
        return f"{self.name}-new-data-{fingerprint[:12]}" + (f"-{change}" if change else "")

    def _trained_on(self, slot: str) -> None:
        """A new-data job was submitted: its fingerprint is the one later changes are measured from."""
        fingerprint, _, change = slot.partition("@")
        if int(change or 0) >= int(self.history.get(self.name, "data_changes") or 0):  # not an older retry
            self.history.put(self.name, "data_fingerprint", fingerprint)
            self.history.put(self.name, "data_changes", change or "0")

    def _refresh_statuses(self) -> None:
        for job_id in self.history.unsettled_jobs():
            try:
                self.history.set_job_status(job_id, jobs.status(job_id, self.template.address))
            except Exception as error:  # noqa: BLE001 - e.g. refused credentials; asked again at the next tick
                self._say_once(("status", job_id), f"could not read the status of job {job_id}: {error_line(error)}")

    # --------------------------------------------------------------- slots

    def _slot_after(self, moment: datetime) -> datetime:
        """The first slot after `moment`, as a UTC instant (see the class docstring for clock changes)."""
        from croniter import croniter

        expression, tz = self.cron
        # croniter steps through naive wall-clock times, each then placed on the UTC time line;
        # in a repeated hour the wall clock goes back, so slots already passed are stepped over.
        wall = croniter(expression, moment.astimezone(tz).replace(tzinfo=None))
        for _ in range(_MAX_CRON_STEPS):
            slot = _instant(wall.get_next(datetime), tz)
            if slot > moment:
                return slot
        raise ScheduleError(f"--cron {expression!r}: no slot after {moment.isoformat()} within "
                            f"{_MAX_CRON_STEPS} steps")

    def _slots_between(self, after: datetime, until: datetime) -> list[datetime]:
        """Slots in (after, until]."""
        slots, slot = [], self._slot_after(after)
        while slot <= until and len(slots) < 10_000:
            slots.append(slot)
            slot = self._slot_after(slot)
        return slots


def _instant(wall: datetime, tz) -> datetime:
    """The UTC instant of the naive wall-clock time `wall` in `tz`: its first occurrence where the
    clock repeats it, and the moment the clock jumps where it skips it."""
    first = wall.replace(tzinfo=tz).astimezone(timezone.utc)  # fold=0: the earlier of two occurrences
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # Skipped: read with the offset after the jump it lies before the jump, with the one before it, after.
    low, high = (int(wall.replace(tzinfo=tz, fold=1).astimezone(timezone.utc).timestamp()), int(first.timestamp()))
    while high - low > 1:  # the first second whose wall-clock time is past `wall`
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, timezone.utc)


def _joined(*parts: str) -> str:
    return "; ".join(filter(None, parts))


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compact(iso: str) -> str:
    """2026-12-01T03:00:00+00:00 -> 20261201T030000: for run names and job ids."""
    return "".join(c for c in iso[:19] if c.isalnum())
