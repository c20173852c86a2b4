"""The scheduler's triggers against a stand-in job server (real HTTP on 127.0.0.1, Ray's own client):
errors that must not stop it, triggers left half-handled, new data, clock changes and credentials.

The scheduler runs in the test's process, with the time of each tick given, over a real
SQLite history and, for new data, the fingerprint of a real source folder. Firing real
Ray jobs is in tests/test_jobs.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from components.experiment_file import load_config
from pipelines import stages
from pipelines.schedule import History, JobTemplate, Scheduler
from tests.helpers import TINY_EXPERIMENT, cli_command, cli_env, gptforge
from tests.job_server import JobServer

SECRET = "s3cret9f3k/Xq@z"  # a "/" and an "@" in it, percent-encoded in the address
DEC_1 = datetime(2026, 12, 1, tzinfo=timezone.utc)


@pytest.fixture
def server():
    job_server = JobServer()
    try:
        yield job_server
    finally:
        job_server.close()


def _scheduler(tmp_path, address: str, **options):
    said: list[str] = []
    template = JobTemplate("tiny", "experiments/tiny.yaml", (), {}, address)
    scheduler = Scheduler(template, History(tmp_path / "schedule.db"), tmp_path / "schedule-tiny.lock",
                          say=said.append, **options)
    return scheduler, said


def _rows(tmp_path, kind: str | None = None):
    return [r for r in History(tmp_path / "schedule.db").triggers("tiny") if kind in (None, r.kind)]


# ------------------------------------------------------------ errors do not stop the scheduler


@pytest.mark.parametrize("method, path, status", [("GET", "/api/jobs/", 500), ("GET", "/api/jobs/", 401),
                                                  ("POST", "/api/jobs/", 401)])
def test_a_job_server_error_fails_the_slot_and_the_next_slot_still_fires(tmp_path, server, method, path, status):
    scheduler, said = _scheduler(tmp_path, server.address, cron="0 3 * * *")
    scheduler.start(now=DEC_1)
    server.fail(method, path, status)
    scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=1))  # raised before: the scheduler died
    failed = _rows(tmp_path)
    assert [(r.slot, r.outcome) for r in failed] == [("2026-12-01T03:00:00+00:00", "failed")]
    assert str(status) in failed[0].detail or "Authentication required" in failed[0].detail
    scheduler.tick(now=DEC_1 + timedelta(days=1, hours=3, seconds=1))
    assert [r.outcome for r in _rows(tmp_path)] == ["failed", "submitted"]
    assert list(server.jobs) == ["gptforge-tiny-cron-20261202T030000"]
    assert any("could not" in m for m in said)


def test_a_refused_status_refresh_is_said_once_and_the_scheduler_goes_on(tmp_path):
    server = JobServer(new_status="RUNNING")
    try:
        scheduler, said = _scheduler(tmp_path, server.address, cron="0 3 * * *")
        scheduler.start(now=DEC_1)
        scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=1))
        server.fail("GET", "/api/jobs/gptforge-", 401, times=2)  # AuthenticationError in Ray's client
        scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=6))
        scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=11))
        server.jobs["gptforge-tiny-cron-20261201T030000"]["status"] = "SUCCEEDED"
        scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=16))
    finally:
        server.close()
    assert sum("could not read the status of job gptforge-tiny-cron-20261201T030000" in m for m in said) == 1
    assert [r.job_status for r in _rows(tmp_path)] == ["SUCCEEDED"]


def _source(tmp_path):
    """A real source folder and the fingerprint the new-data trigger watches."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    cfg = load_config(TINY_EXPERIMENT, [f"data.source={folder}", "data.max_bytes=0", f"workdir={tmp_path}"])
    return folder, lambda: stages.source_fingerprint(cfg)


def _poll(scheduler, times: int = 1) -> None:
    for _ in range(times):
        time.sleep(0.06)  # past poll_s
        scheduler.tick()


def test_a_briefly_missing_source_folder_does_not_stop_the_scheduler(tmp_path, server):
    folder, fingerprint = _source(tmp_path)
    scheduler, said = _scheduler(tmp_path, server.address, fingerprint=fingerprint, poll_s=0.05)
    scheduler.start()
    _poll(scheduler)  # the baseline
    folder.rename(tmp_path / "moved")  # a sync tool replacing the folder
    _poll(scheduler, 2)  # raised before
    assert sum("reading the data sources' fingerprint" in m for m in said) == 1, said
    (tmp_path / "moved").rename(folder)
    (folder / "b.txt").write_text("print('new data')\n" * 50)
    _poll(scheduler)
    assert [(r.kind, r.outcome) for r in _rows(tmp_path)] == [("new_data", "submitted")]


# ------------------------------------------------------------ a trigger left claimed


def test_a_trigger_left_claimed_is_fired_when_the_next_scheduler_starts(tmp_path, server):
    slot = "2026-12-01T03:00:00+00:00"
    assert History(tmp_path / "schedule.db").claim("tiny", "cron", slot)  # its scheduler died right after
    scheduler, said = _scheduler(tmp_path, server.address, cron="0 3 * * *")
    scheduler.start(now=DEC_1 + timedelta(hours=4))
    assert [(r.slot, r.outcome, r.job_id) for r in _rows(tmp_path)] == [
        (slot, "submitted", "gptforge-tiny-cron-20261201T030000")]
    assert list(server.jobs) == ["gptforge-tiny-cron-20261201T030000"]


def test_a_claimed_trigger_whose_job_was_submitted_is_not_submitted_twice(tmp_path, server):
    slot = "2026-12-01T03:00:00+00:00"
    History(tmp_path / "schedule.db").claim("tiny", "cron", slot)
    server.add_job("gptforge-tiny-cron-20261201T030000")  # it died after the submit, before the answer
    scheduler, _ = _scheduler(tmp_path, server.address, cron="0 3 * * *")
    scheduler.start(now=DEC_1 + timedelta(hours=4))
    row, = _rows(tmp_path)
    assert (row.outcome, row.job_id) == ("submitted", "gptforge-tiny-cron-20261201T030000")
    assert ("POST", "/api/jobs/") not in server.requests and len(server.jobs) == 1


def test_submitting_an_id_the_job_server_already_has_returns_that_job(server):
    from pipelines import jobs

    first = jobs.submit(server.address, "experiments/tiny.yaml", [], experiment_name="tiny", env={},
                        submission_id="gptforge-tiny-cron-20261201T030000")
    again = jobs.submit(server.address, "experiments/tiny.yaml", [], experiment_name="tiny", env={},
                        submission_id="gptforge-tiny-cron-20261201T030000")  # refused by the server as a duplicate
    assert first == again == "gptforge-tiny-cron-20261201T030000" and len(server.jobs) == 1


# ------------------------------------------------------------ new data


def test_new_data_whose_submit_failed_is_submitted_at_the_next_poll(tmp_path, server):
    folder, fingerprint = _source(tmp_path)
    scheduler, _ = _scheduler(tmp_path, server.address, fingerprint=fingerprint, poll_s=0.05)
    scheduler.start()
    _poll(scheduler)
    (folder / "b.txt").write_text("print('new data')\n" * 50)
    server.fail("POST", "/api/jobs/", 500)
    _poll(scheduler)
    assert [r.outcome for r in _rows(tmp_path)] == ["failed"]
    _poll(scheduler)  # never retried before: the fingerprint was stored before the submit
    assert [r.outcome for r in _rows(tmp_path)] == ["submitted"]
    assert len(server.jobs) == 1
    _poll(scheduler, 2)
    assert len(server.jobs) == 1  # the data did not change again


def test_data_returning_to_an_earlier_state_fires_again(tmp_path, server):
    folder, fingerprint = _source(tmp_path)
    scheduler, _ = _scheduler(tmp_path, server.address, fingerprint=fingerprint, poll_s=0.05)
    scheduler.start()
    _poll(scheduler)  # A, the baseline
    for text in ("B", "A", "B"):
        if text == "B":
            (folder / "b.txt").write_text("print('new data')\n" * 50)
        else:
            (folder / "b.txt").unlink()
        _poll(scheduler)
    rows = _rows(tmp_path)
    assert [r.outcome for r in rows] == ["submitted"] * 3
    assert rows[0].slot.split("@")[0] == rows[2].slot.split("@")[0] != rows[1].slot.split("@")[0]
    assert len(server.jobs) == 3


def test_new_data_while_a_job_runs_is_submitted_once_the_job_ends(tmp_path):
    server = JobServer()
    server.add_job("someone-elses-run", status="RUNNING")
    try:
        folder, fingerprint = _source(tmp_path)
        scheduler, said = _scheduler(tmp_path, server.address, fingerprint=fingerprint, poll_s=0.05)
        scheduler.start()
        _poll(scheduler)
        (folder / "b.txt").write_text("print('new data')\n" * 50)
        _poll(scheduler, 3)
        assert [r.outcome for r in _rows(tmp_path)] == ["skipped"]
        assert sum("skipped: job someone-elses-run" in m for m in said) == 1  # said once, not every poll
        server.jobs["someone-elses-run"]["status"] = "SUCCEEDED"
        _poll(scheduler)
    finally:
        server.close()
    assert [r.outcome for r in _rows(tmp_path)] == ["submitted"]


# ------------------------------------------------------------ clock changes


def _fired_over(tmp_path, server, cron: str, start: datetime, hours: int, step_minutes: int = 5) -> list[str]:
    scheduler, _ = _scheduler(tmp_path, server.address, cron=cron, tz_name="Europe/Berlin")
    scheduler.start(now=start)
    for minutes in range(step_minutes, hours * 60 + 1, step_minutes):
        scheduler.tick(now=start + timedelta(minutes=minutes, seconds=1))
    return [r.slot for r in _rows(tmp_path, "cron")]


def test_a_cron_slot_in_the_repeated_hour_fires_once_in_autumn(tmp_path, server):
    # 2026-10-25: Berlin's clock goes from 03:00 summer time back to 02:00; 02:30 happens twice.
    fired = _fired_over(tmp_path, server, "30 2 * * *", datetime(2026, 10, 24, 20, tzinfo=timezone.utc), 30)
    assert fired == ["2026-10-25T00:30:00+00:00",  # 02:30 summer time (UTC+2), its first occurrence
                     "2026-10-26T01:30:00+00:00"]  # 02:30 winter time (UTC+1) the next night
    assert len(server.jobs) == 2


def test_a_cron_slot_in_the_skipped_hour_fires_once_at_the_jump_in_spring(tmp_path, server):
    # 2026-03-29: Berlin's clock jumps from 02:00 winter time to 03:00; 02:30 never happens.
    fired = _fired_over(tmp_path, server, "30 2 * * *", datetime(2026, 3, 28, 20, tzinfo=timezone.utc), 30)
    assert fired == ["2026-03-29T01:00:00+00:00",  # the jump: 03:00 summer time
                     "2026-03-30T00:30:00+00:00"]  # 02:30 summer time (UTC+2) the next night


def test_an_every_half_hour_cron_fires_each_wall_clock_slot_once_in_autumn(tmp_path, server):
    fired = _fired_over(tmp_path, server, "*/30 1-3 * * *", datetime(2026, 10, 24, 22, tzinfo=timezone.utc), 5)
    # 01:00 01:30 02:00 02:30 summer time, then 03:00 03:30 winter time: the repeated 02:00-03:00 only once.
    assert fired == ["2026-10-24T23:00:00+00:00", "2026-10-24T23:30:00+00:00", "2026-10-25T00:00:00+00:00",
                     "2026-10-25T00:30:00+00:00", "2026-10-25T02:00:00+00:00", "2026-10-25T02:30:00+00:00"]


# ------------------------------------------------------------ credentials


def test_credentials_in_the_address_are_never_said_or_stored(tmp_path):
    server = JobServer(credentials=("admin", SECRET))
    address = server.address
    try:
        scheduler, said = _scheduler(tmp_path, address, cron="0 3 * * *")
        scheduler.start(now=DEC_1)
        scheduler.tick(now=DEC_1 + timedelta(hours=3, seconds=1))
        assert _rows(tmp_path)[0].outcome == "submitted"  # the credentials reached the server
        server.fail("POST", "/api/jobs/", 500)
        scheduler.tick(now=DEC_1 + timedelta(days=1, hours=3, seconds=1))
    finally:
        server.close()
    scheduler.tick(now=DEC_1 + timedelta(days=2, hours=3, seconds=1))  # nobody answers: the address is named
    rows = _rows(tmp_path)
    assert [r.outcome for r in rows] == ["submitted", "failed", "failed"]
    assert "no Ray job server answers at http://admin:***@127.0.0.1" in rows[2].detail
    assert not any("9f3k" in text for text in [*said, *(r.detail for r in rows)])
    history = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--history", cwd=tmp_path)
    assert history.returncode == 0, history.stderr
    assert "admin:***@127.0.0.1" in history.stdout and "9f3k" not in history.stdout


def test_gptforge_schedule_and_jobs_print_no_credentials(tmp_path):
    server = JobServer(credentials=("admin", SECRET))
    log = tmp_path / "schedule.log"
    try:
        jobs_out = gptforge("jobs", "--address", server.address, cwd=tmp_path)
        assert jobs_out.returncode == 0, jobs_out.stderr
        assert jobs_out.stdout.startswith("no jobs at http://admin:***@127.0.0.1")
        with open(log, "w") as out:  # every second a slot; each job ends at once
            process = subprocess.Popen(
                cli_command("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--cron", "* * * * * *",
                            "--address", server.address),
                cwd=tmp_path, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "submitted job" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        server.fail("GET", "/api/jobs/", 500, times=2)
        server.fail("POST", "/api/jobs/", 401, times=2)
        time.sleep(4)
        assert process.poll() is None, log.read_text()[-3000:]  # still running
    finally:
        if "process" in locals() and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
        server.close()
    output = log.read_text()
    assert "jobs at http://admin:***@127.0.0.1" in output and "could not" in output, output[-3000:]
    assert "9f3k" not in output, output
