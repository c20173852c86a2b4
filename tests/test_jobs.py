"""Ray Jobs, the stage cache and the scheduler against a real local Ray head and a real MLflow store.

One head (`ray start --head` on 127.0.0.1, its own ports and temp dir) serves the whole
module, and one MLflow store that the test chose (not the workdir's default). The first
test runs the tiny experiment through `gptforge submit --follow`; the tests after it
re-run the same experiment, so their stages come from the stage cache.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.tracking import CACHED_FROM_TAG, PARENT_TAG
from tests.cluster_processes import BIN, RayNode
from tests.helpers import run_id_of, stage_runs, JOB_OVERRIDES, REPO, TINY_EXPERIMENT, cli_command, cli_env, gptforge

pytestmark = pytest.mark.integration

CACHED_STAGES = ("prepare_data", "pretrain", "finetune")


class RayHead(RayNode):
    """`ray start --head` on 127.0.0.1 with free ports, a temp dir of its own and 4 CPUs; its
    job server at `address`. Stopping it first stops the jobs still running, then its processes."""

    def __init__(self):
        super().__init__(4)
        self.address = self.dashboard_url
        self.wait_until_in_cluster(1)

    def stop(self) -> None:
        from pipelines import jobs

        try:
            for job in jobs.list_jobs(self.address):
                if job.status in ("PENDING", "RUNNING"):
                    jobs.stop(job.job_id, self.address)
        except Exception:  # noqa: BLE001 - the head may be what failed; kill it below anyway
            pass
        super().stop()


@pytest.fixture(scope="module")
def head():
    ray_head = RayHead()
    try:
        yield ray_head
    finally:
        ray_head.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workdir and an MLflow store the test chose (not the workdir's default SQLite file)."""
    root = tmp_path_factory.mktemp("jobs")
    uri = f"sqlite:///{root / 'chosen' / 'mlflow.db'}"
    (root / "chosen").mkdir()
    return {"root": root, "workdir": root / "work", "uri": uri, "env": {"MLFLOW_TRACKING_URI": uri}}


def _pipeline_runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if PARENT_TAG not in r.data.tags]


@pytest.fixture(scope="module")
def first_job(head, store):
    """The tiny experiment submitted with `gptforge submit --follow`: the runs every later test reuses."""
    started = time.monotonic()
    result = gptforge("submit", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"workdir={store['workdir']}",
                      "--address", head.address, "--follow", cwd=store["root"], env=store["env"], timeout=900)
    print(f"first run through `gptforge submit --follow`: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_submit_follow_runs_the_pipeline_as_a_ray_job(first_job, head, store):
    out = first_job.stdout
    job_id = re.search(r"submitted job (\S+) to " + re.escape(head.address), out).group(1)
    assert "==> pretrain" in out and "became champion" in out  # the job's own output, streamed
    assert out.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    runs = _pipeline_runs(store["uri"])
    assert [r.info.run_id for r in runs] == [run_id_of(out)]  # in the store the test chose
    assert runs[0].info.status == "FINISHED"
    assert not (store["workdir"] / "mlflow.db").exists()  # not in the workdir's default store
    assert MlflowClient(store["uri"]).get_model_version_by_alias("tiny", "champion") is not None
    listed = gptforge("jobs", "--address", head.address, cwd=store["root"])
    assert re.search(rf"{job_id}\s+SUCCEEDED\s+.*\s+tiny\s+python -m pipelines.cli run", listed.stdout), listed.stdout


def test_an_unchanged_rerun_recomputes_nothing(first_job, store):
    started = time.monotonic()
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"workdir={store['workdir']}",
                      cwd=store["root"], env=store["env"])
    took = time.monotonic() - started
    print(f"unchanged re-run (embedded Ray, stages from the cache): {took:.1f}s")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("    cached: reusing the output of run") == len(CACHED_STAGES)
    first = stage_runs(store["uri"], run_id_of(first_job.stdout))
    again = stage_runs(store["uri"], run_id_of(result.stdout))
    for stage in CACHED_STAGES:
        assert again[stage].data.tags[CACHED_FROM_TAG] == first[stage].info.run_id  # linked to the producer
        assert "train/loss" not in again[stage].data.metrics  # nothing trained in this run
    # No training ran: only the first run's folder holds Ray Train storage (runs/<run>/<stage>/).
    runs = store["workdir"] / "runs"
    trained = sorted(p.relative_to(runs).as_posix() for stage in ("pretrain", "finetune") for p in runs.glob(f"*/{stage}"))
    first_id = run_id_of(first_job.stdout)
    assert trained == [f"{first_id}/finetune", f"{first_id}/pretrain"]


@pytest.mark.slow
def test_changing_finetune_lr_reruns_finetune_and_what_follows_only(first_job, store):
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "finetune.lr=5e-3", f"workdir={store['workdir']}",
                      cwd=store["root"], env=store["env"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = stage_runs(store["uri"], run_id_of(result.stdout))
    first = stage_runs(store["uri"], run_id_of(first_job.stdout))
    assert runs["prepare_data"].data.tags[CACHED_FROM_TAG] == first["prepare_data"].info.run_id
    assert runs["pretrain"].data.tags[CACHED_FROM_TAG] == first["pretrain"].info.run_id
    assert CACHED_FROM_TAG not in runs["finetune"].data.tags
    assert runs["finetune"].data.metrics["train/step"] == 3  # trained again, with the new lr
    assert runs["finetune"].data.params["finetune.lr"] == "0.005"
    for stage in ("quantize", "evaluate", "promote"):
        assert runs[stage].info.status == "FINISHED"


@pytest.mark.slow
def test_no_cache_and_cache_false_force_the_work(first_job, store):
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "pretrain.cache=false",
                      f"workdir={store['workdir']}", cwd=store["root"], env=store["env"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    runs = stage_runs(store["uri"], run_id_of(result.stdout))
    assert CACHED_FROM_TAG in runs["prepare_data"].data.tags
    assert CACHED_FROM_TAG not in runs["pretrain"].data.tags  # cache: false
    assert runs["pretrain"].data.metrics["train/step"] == 6  # trained again
    # finetune's key holds its inputs' keys, which did not change (pretraining is seeded): still cached.
    assert CACHED_FROM_TAG in runs["finetune"].data.tags
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "--no-cache", f"workdir={store['workdir']}",
                      cwd=store["root"], env=store["env"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "cached:" not in result.stdout
    runs = stage_runs(store["uri"], run_id_of(result.stdout))
    assert not any(CACHED_FROM_TAG in r.data.tags for r in runs.values())


@pytest.mark.slow
def test_plain_ray_job_submit_runs_the_same_experiment(first_job, head, store):
    before = {r.info.run_id for r in _pipeline_runs(store["uri"])}
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": store["uri"]}}
    result = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "gptforge", "run", "experiments/tiny.yaml", *JOB_OVERRIDES, f"workdir={store['workdir']}"],
        cwd=store["root"], env={**head.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout.lower()
    new = [r for r in _pipeline_runs(store["uri"]) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"


def test_submitting_an_id_the_job_server_has_starts_no_second_job(head, tmp_path):
    """What makes a scheduler's retry of a half-handled trigger safe, against the real job server."""
    script = (f"from pipelines import jobs\n"
              f"for _ in range(2):\n"
              f"    print(jobs.submit({head.address!r}, 'experiments/tiny.yaml', ['no_such.key=1'], "
              f"experiment_name='duplicate', env={{}}, submission_id='gptforge-duplicate-1'))\n"
              f"print([j.job_id for j in jobs.list_jobs({head.address!r}, 'duplicate')])\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**head.env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == ["gptforge-duplicate-1", "gptforge-duplicate-1",
                                             "['gptforge-duplicate-1']"], result.stdout


def _wait_for_status(head, job_id: str, wanted: tuple, timeout: float = 300) -> str:
    from pipelines import jobs

    deadline = time.monotonic() + timeout
    while (status := jobs.status(job_id, head.address)) not in wanted:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(1)
    return status


# Slow (minutes on 2 cores): kept out of the default suite so CI stays near 15 minutes.
@pytest.mark.slow
def test_jobs_logs_and_stop(first_job, head, store):
    result = gptforge("submit", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "--no-cache", f"workdir={store['workdir']}",
                      "--address", head.address, cwd=store["root"], env=store["env"])
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    assert f"gptforge logs {job_id} --follow" in result.stdout
    _wait_for_status(head, job_id, ("RUNNING",))
    deadline = time.monotonic() + 300
    while "==> prepare_data" not in (logs := gptforge("logs", job_id, "--address", head.address,
                                                       cwd=store["root"]).stdout):
        assert time.monotonic() < deadline, logs
        time.sleep(2)
    listed = gptforge("jobs", "--address", head.address, cwd=store["root"]).stdout
    assert re.search(rf"{job_id}\s+RUNNING", listed), listed
    stopped = gptforge("stop", job_id, "--address", head.address, cwd=store["root"])
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    assert _wait_for_status(head, job_id, ("STOPPED", "FAILED", "SUCCEEDED")) == "STOPPED"
    # The stopped pipeline ended its MLflow runs (SIGTERM -> KILLED), none is left RUNNING.
    deadline = time.monotonic() + 60
    while any(r.info.status == "RUNNING" for r in _pipeline_runs(store["uri"])):
        assert time.monotonic() < deadline, "the stopped job left its MLflow run RUNNING"
        time.sleep(1)
    missing = gptforge("logs", "no-such-job", "--address", head.address, cwd=store["root"])
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


# ------------------------------------------------------------------ the scheduler


class Scheduler:
    """`gptforge schedule` in its own process, its output in a file."""

    def __init__(self, head, store, name: str, *args: str):
        self.path = store["root"] / f"{name}.log"
        self._log = open(self.path, "w")
        self.process = subprocess.Popen(
            cli_command("schedule", *args, "--address", head.address), cwd=store["root"],
            env=cli_env(store["env"]), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.path.read_text())):
            assert self.process.poll() is None, self.path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.path.read_text()[-3000:]}"
            time.sleep(0.5)
        return match

    def stop(self) -> str:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        self._log.close()
        return self.path.read_text()


def _fired(output: str) -> list[tuple[str, str]]:
    """(slot, what happened) for every cron trigger a scheduler handled."""
    return re.findall(r"cron trigger (\S+?):? (submitted job|skipped)", output)


def _stop_running_jobs(head) -> None:
    from pipelines import jobs

    for job in jobs.list_jobs(head.address):
        if job.status in ("PENDING", "RUNNING"):
            jobs.stop(job.job_id, head.address)
            _wait_for_status(head, job.job_id, ("STOPPED", "FAILED", "SUCCEEDED"))


@pytest.mark.slow
def test_scheduler_fires_skips_overlaps_and_survives_restarts(first_job, head, store):
    from pipelines import jobs

    _stop_running_jobs(head)
    args = [str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"workdir={store['workdir']}", "--cron", "* * * * * */4"]
    outputs = []
    first = Scheduler(head, store, "scheduler-1", *args)
    try:
        job_id = first.wait_for(r"cron trigger \S+: submitted job (\S+)").group(1)
        # The job (a cached run, still tens of seconds) outlasts the next 4-second slot.
        first.wait_for(r"cron trigger \S+ skipped: job \S+ of 'tiny' is still (running|pending)")
    finally:
        outputs.append(first.stop())
    time.sleep(5)  # down for at least one 4-second slot
    # Restarted: the slots it missed while down are handled once (run_once), none twice.
    second = Scheduler(head, store, "scheduler-2", *args, "--missed", "run_once")
    try:
        second.wait_for(r"next run at")
        second.wait_for(r"cron trigger \S+ (submitted job|skipped)", timeout=60)
    finally:
        outputs.append(second.stop())
    time.sleep(9)  # down for two slots or more
    third = Scheduler(head, store, "scheduler-3", *args, "--missed", "skip")
    try:
        third.wait_for(r"slot\(s\) missed while down; skipped \(--missed skip\)")
    finally:
        outputs.append(third.stop())

    slots = [slot for output in outputs for slot, _ in _fired(output)]
    assert len(slots) == len(set(slots)), slots  # no slot handled twice, across three schedulers
    assert "missed while down; running the newest" in outputs[1]  # run_once
    history = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={store['workdir']}", "--history",
                       cwd=store["root"]).stdout
    assert re.search(r"cron\s+\S+\s+submitted\s+" + re.escape(job_id), history), history
    assert re.search(r"skipped\s+.*still (running|pending)", history), history
    assert "--missed skip" in history
    # Each submitted row is exactly one Ray job, named after its slot; the first ran to the end.
    submitted = re.findall(r"submitted\s+(gptforge-tiny-cron-\S+)", history)
    scheduled = [j for j in jobs.list_jobs(head.address, "tiny") if j.run_name.startswith("tiny-cron-")]
    assert sorted(submitted) == sorted(j.job_id for j in scheduled)
    assert _wait_for_status(head, job_id, ("SUCCEEDED", "FAILED", "STOPPED"), timeout=600) == "SUCCEEDED"
    _stop_running_jobs(head)
    run_name = job_id.removeprefix("gptforge-")
    named = [r for r in _pipeline_runs(store["uri"]) if r.info.run_name == run_name]
    assert len(named) == 1 and named[0].info.status == "FINISHED"


@pytest.mark.slow
def test_new_data_in_the_source_folder_triggers_a_job(head, store):
    _stop_running_jobs(head)
    source = store["root"] / "corpus"
    source.mkdir()
    stdlib = Path(os.__file__).parent
    for name in ("os.py", "json/__init__.py", "pathlib.py"):
        (source / name.replace("/", "_")).with_suffix(".txt").write_text((stdlib / name).read_text())
    workdir = store["root"] / "newdata-work"
    scheduler = Scheduler(head, store, "scheduler-new-data", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "name=tinynew",
                          f"data.source={source}", "data.max_bytes=0", f"workdir={workdir}", "--on-new-data",
                          "--poll", "1")
    try:
        scheduler.wait_for("recorded the data sources' fingerprint")
        time.sleep(2)
        assert "submitted job" not in scheduler.path.read_text()  # nothing changed yet
        (source / "added.txt").write_text((stdlib / "shutil.py").read_text())
        job_id = scheduler.wait_for(r"new_data trigger \S+: submitted job (\S+)", timeout=120).group(1)
    finally:
        scheduler.stop()
    _stop_running_jobs(head)
    history = gptforge("schedule", str(TINY_EXPERIMENT), "name=tinynew", f"workdir={workdir}", "--history",
                       cwd=store["root"]).stdout
    assert re.search(r"new_data\s+[0-9a-f]{25}\s+submitted\s+" + re.escape(job_id), history), history
