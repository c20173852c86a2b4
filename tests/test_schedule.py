"""Fast checks of `gptforge schedule` / `submit` input and of the trigger history; no Ray is started.

The scheduler firing real Ray jobs is in tests/test_jobs.py (it needs the Ray head there).
"""
import time
from datetime import datetime, timezone

import pytest

from pipelines.schedule import History, ScheduleError, check_cron
from tests.helpers import TINY_EXPERIMENT, free_port, gptforge


def test_a_bad_cron_string_fails_at_once(tmp_path):
    started = time.monotonic()
    result = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--cron", "61 * * *", cwd=tmp_path)
    assert result.returncode == 2
    assert "--cron '61 * * *': not a valid cron expression" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # the CLI's imports only: nothing waits for a server


def test_an_unknown_time_zone_fails_at_once(tmp_path):
    result = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--cron", "0 3 * * *",
                      "--timezone", "Mars/Olympus_Mons", cwd=tmp_path)
    assert result.returncode == 2
    assert "--timezone 'Mars/Olympus_Mons': unknown time zone" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 3 * * *"], ["jobs"]])
def test_an_unreachable_job_server_fails_at_once_with_its_address(tmp_path, command):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = [command[0], *([str(TINY_EXPERIMENT), f"workdir={tmp_path}"] if command[0] != "jobs" else []),
            *command[1:], "--address", address]
    started = time.monotonic()
    result = gptforge(*args, cwd=tmp_path)
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert f"no Ray job server answers at {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 60, took


def test_ray_api_server_address_is_honoured(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    result = gptforge("jobs", cwd=tmp_path, env={"RAY_API_SERVER_ADDRESS": address, "RAY_ADDRESS": "auto"})
    assert result.returncode == 2
    assert f"no Ray job server answers at {address}" in result.stderr


def test_schedule_needs_a_trigger(tmp_path):
    result = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "give --cron EXPR, --on-new-data, or both" in result.stderr


def test_cron_check_reads_the_time_zone():
    expression, tz = check_cron("0 3 * * *", "Europe/Berlin")
    assert tz.key == "Europe/Berlin"
    with pytest.raises(ScheduleError, match="Mars"):
        check_cron("0 3 * * *", "Mars")


def test_history_claims_a_slot_once_across_instances(tmp_path):
    db = tmp_path / "schedule.db"
    first, second = History(db), History(db)  # two schedulers on one workdir, or one restarted
    slot = datetime(2026, 12, 1, 3, tzinfo=timezone.utc).isoformat()
    assert first.claim("tiny", "cron", slot)
    assert not second.claim("tiny", "cron", slot)
    assert second.claim("tiny", "new_data", "abc")  # another kind of trigger is its own slot
    first.settle("tiny", "cron", slot, "submitted", "gptforge-job-1", "PENDING", "tiny-cron-20261201T030000")
    second.set_job_status("gptforge-job-1", "SUCCEEDED")
    rows = History(db).triggers("tiny")
    assert [(r.kind, r.outcome, r.job_status) for r in rows] == [("cron", "submitted", "SUCCEEDED"),
                                                                  ("new_data", "claimed", None)]
    assert History(db).last_slot("tiny", "cron") == slot
    assert History(db).unsettled_jobs() == []


def test_history_prints_an_empty_history(tmp_path):
    result = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--history", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no triggers of experiment 'tiny'" in result.stdout
